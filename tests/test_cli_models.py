"""Every verb that takes a model resolves its name through `dreamlm.hub.resolve`: bundled names, pulled names (an
adapted one included), paths; an unknown name is one error line listing the names that exist. Each verb is stopped
where it would load the model, so the test sees the directory it was about to use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.hub import assets_dir

runner = CliRunner()
SUDOKU = "1200001221000021"

VERBS = {  # the verb's arguments, {m} the model, {tmp} a scratch folder
    "generate": ["generate", "hi", "-m", "{m}"],
    "infill": ["infill", "x = <|mask|>", "-m", "{m}"],
    "solve": ["solve", "sudoku", SUDOKU, "-m", "{m}"],
    "serve": ["serve", "{m}", "--port", "0"],
    "export": ["export", "{m}", "{tmp}/out.gguf"],
    "eval": ["eval", "-m", "{m}"],
    "bench chat": ["bench", "chat", "-m", "{m}", "--ar", "{m}", "--out", "{tmp}/bench"],
    "bench infill": ["bench", "infill", "-m", "diffusion={m}", "--out", "{tmp}/bench"],
    "bench serve": ["bench", "serve", "-m", "{m}", "--out", "{tmp}/bench"],
}


@pytest.fixture
def stopped(monkeypatch, tmp_path) -> Path:
    """Every place a verb loads a model raises 'stop: DIR'; a cache where smollm2 (with an adapter) and smollm2-ar
    are pulled (copies of tiny-dream). Returns the cache."""
    import dreamlm.eval
    import dreamlm.infill_bench
    import dreamlm.serve.bench
    from dreamlm.model import DreamModel

    def stop(path, *args, **kwargs):
        raise DreamError(f"stop: {Path(path)}")

    monkeypatch.setattr(DreamModel, "from_pretrained", classmethod(lambda cls, path, *a, **k: stop(path)))
    monkeypatch.setattr(dreamlm.eval, "evaluate", stop)
    monkeypatch.setattr(dreamlm.serve.bench, "serve_bench", stop)
    monkeypatch.setattr(dreamlm.infill_bench, "infill_bench", lambda specs, *a, **k: stop(specs[0][2]))
    home = tmp_path / "home"
    for name in ("smollm2-ar", "smollm2"):  # the order a pull installs them
        shutil.copytree(assets_dir() / "tiny-dream", home / name)
    adapter = home / "smollm2" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": "smollm2-base"}))
    monkeypatch.setenv("DREAMLM_HOME", str(home))
    return home


def run(verb: str, model: str, tmp: Path):
    args = [a.replace("{m}", model).replace("{tmp}", str(tmp)) for a in VERBS[verb]]
    return runner.invoke(app, args)


def error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("precision:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_resolves_bundled_pulled_and_path_names_alike(verb, stopped, tmp_path):
    solver = "sudoku4-diffusion" if verb == "solve" else "tiny-dream"  # solve needs a planning model
    cases = {solver: assets_dir() / solver, "smollm2": stopped / "smollm2" / "adapter",
             "smollm2-ar": stopped / "smollm2-ar", str(assets_dir() / solver): assets_dir() / solver}
    for name, directory in cases.items():
        line = error_line(run(verb, name, tmp_path))
        # where the verb stopped names the directory it resolved (solve refuses the non-planning ones itself)
        assert f"stop: {directory}" in line or (verb == "solve" and f"{directory} is not a planning" in line), line


@pytest.mark.parametrize("verb", VERBS)
def test_an_unknown_name_is_one_line_listing_the_names(verb, stopped, tmp_path):
    line = error_line(run(verb, "no-such-model", tmp_path))
    assert "unknown model 'no-such-model'" in line, line
    for name in ("tiny-dream", "stdlib-code", "smollm2", "smollm2-ar"):
        assert name in line, line
    line = error_line(run(verb, "./no/such/dir", tmp_path))
    assert "model directory ./no/such/dir does not exist" in line, line
