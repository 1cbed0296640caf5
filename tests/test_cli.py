"""The CLI: jobs work on the bundled model; every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dreamlm.cli import app, default_model_dir

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_bundled_model_generates_json():
    res = run("generate", "def fibonacci(n):", "--max-new-tokens", 12, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["steps"] == 12 and data["alg"] == "entropy" and len(data["ids"]) <= 12


def test_generate_show_and_chat(tiny_dir):
    res = run("generate", "hi", "--model", tiny_dir, "--chat", "--show", "--max-new-tokens", 6, "--delay", 0)
    assert res.exit_code == 0, res.output
    assert "step 6/6" in res.output and "0 masks left" in res.output


def test_infill_json(tiny_dir):
    res = run("infill", "x = <|mask:3|> + 1", "--model", tiny_dir, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["text"].startswith("x = ") and data["text"].endswith(" + 1") and len(data["fills"]) == 1


def test_infill_show(tiny_dir):
    """--show draws the canvas until the spans are filled; the text outside them is in the last frame."""
    res = run("infill", "x = <|mask:3|> + 1", "--model", tiny_dir, "--show", "--delay", 0, "--steps", 3)
    assert res.exit_code == 0, res.output
    assert "step 3/3" in res.output and "0 masks left" in res.output and "x = " in res.output


def test_info(tiny_dir):
    res = run("info", tiny_dir)
    assert res.exit_code == 0, res.output
    assert "bidirectional" in res.output and "BF16" in res.output and "parameters" in res.output


@pytest.fixture()
def bad_config_dir(tmp_path, tiny_dir):
    target = tmp_path / "bad"
    shutil.copytree(tiny_dir, target)
    (target / "config.json").write_text('{"model_type": "Dream", "vocab_size": "many"}')
    return target


CASES = [
    (["generate", "hi", "--model", "/no/such/dir"], "does not exist"),
    (["generate", "hi", "--steps", "0"], "steps must be an integer >= 1"),
    (["generate", "hi", "--alg", "greedy"], "unknown alg 'greedy'"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be"),
    (["generate", "hi", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--top-k", "0"], "top_k must be"),
    (["generate", "hi", "--eps", "2"], "eps must be in (0, 1)"),
    (["generate", "  "], "the prompt is empty"),
    (["generate", "hi <|bogus|>"], "unknown special token <|bogus|>"),
    (["generate", "word " * 300], "more than the model's context"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be"),
    (["generate", "hi", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["infill", "no spans here"], "no mask span"),
    (["infill", ""], "the template is empty"),
    (["info", "/no/such/dir"], "does not exist"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_user_errors_are_one_line(args, message):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_bad_config_is_one_line(bad_config_dir):
    res = run("generate", "hi", "--model", bad_config_dir)
    assert res.exit_code == 2 and "vocab_size must be an integer, got 'many'" in res.stderr


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "dreamlm.cli", "generate", "hi", "--steps", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "steps must be" in proc.stderr


def test_default_model_is_bundled():
    assert (default_model_dir() / "config.json").is_file()


def test_live_views_draw_special_tokens_as_glyphs():
    from dreamlm.view import readable

    assert readable("0403<|sep|>2413<|endoftext|><|pad|><|pad|>") == "0403 │ 2413⏹··"
