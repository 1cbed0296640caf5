"""Bad input across every CLI verb: a non-zero exit (2), no traceback, one line naming the problem (or click's own
usage message for a value of the wrong type), and no file the user had is changed. Generated where possible."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import socket
import string
import tempfile
import time
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.serve.app import bundled_models
from dreamlm.tasks import make_examples

runner = CliRunner()
BUNDLED = {p.name: p for p in bundled_models()}
SUDOKU = str(BUNDLED["sudoku4-diffusion"])
TINY = str(BUNDLED["tiny-dream"])


@pytest.fixture(scope="module", autouse=True)
def one_click_command():
    """typer rebuilds the click command of the whole app on every invoke (0.1 s, most of a refused case): build
    it once for this module's hundreds of invocations."""
    import functools

    import typer.main
    import typer.testing

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", functools.cache(typer.main.get_command))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A user's folder: files the commands must never change."""
    root = tmp_path_factory.mktemp("user")
    made = {
        "text": root / "notes.txt", "dir": root / "a_dir", "empty_dir": root / "empty_dir",
        "utf16": root / "utf16.jsonl", "binary": root / "binary.jsonl", "numbers": root / "numbers.jsonl",
        "nulls": root / "nulls.jsonl", "notjson": root / "notjson.jsonl", "bom": root / "bom.jsonl",
        "badconfig": root / "badconfig", "badtoml": root / "bad.toml", "emptyfile": root / "empty.jsonl",
        "notext": root / "notext.jsonl",
    }
    made["notext"].write_text('{"title": "x"}\n{"text": 5}\n')
    made["text"].write_text("keep me\n")
    made["dir"].mkdir()
    (made["dir"] / "inside.txt").write_text("keep me too\n")
    made["empty_dir"].mkdir()
    made["utf16"].write_bytes('{"input": "0403\\n3042\\n0234\\n4001"}\n'.encode("utf-16"))
    made["binary"].write_bytes(bytes(range(256)) * 4)
    made["numbers"].write_text('{"input": 12}\n')
    made["nulls"].write_text('{"input": null}\n')
    made["notjson"].write_text("this is not json\n")
    made["bom"].write_bytes(b"\xef\xbb\xbf" + b'{"input": "0403\\n3042\\n0234\\n4001"}\n')
    made["badconfig"].mkdir()
    (made["badconfig"] / "config.json").write_text("{not json")
    made["badtoml"].write_text("[run\nout_dir = ")
    made["emptyfile"].write_text("")
    # a valid tiny recipe and its data, so that a train case fails on exactly the one thing it breaks
    made["train"] = root / "train.jsonl"
    made["train"].write_text("".join(json.dumps(e) + "\n" for e in make_examples("sudoku4", 8, 0)))
    made["recipe"] = root / "recipe.toml"
    made["recipe"].write_text(RECIPE.format(train=json.dumps(str(made["train"])),
                                            out=json.dumps(str(root / "runs" / "recipe"))))
    for name, data in (("latin1", '{"input": "caf\xe9", "output": "x"}\n'.encode("latin-1")),
                       ("utf16text", ("def f():\n    return 1\n" * 20).encode("utf-16")),
                       ("binary_recipe", b"\x00\x01\xff\xfe[model]\x80"),
                       ("latin1_recipe", "[run]\nout_dir = \"caf\xe9\"\n".encode("latin-1")),
                       ("utf16_recipe", "[run]\nseed = 1\n".encode("utf-16")),
                       ("section_toml", b"[bogus]\nx = 1\n")):
        made[name] = root / f"{name}.{'toml' if 'recipe' in name or 'toml' in name else 'jsonl'}"
        made[name].write_bytes(data)
    models = tmp_path_factory.mktemp("models")  # read by the cases, outside the snapshot (kept fast)
    made["qwen2"] = qwen2_source(models / "qwen2")
    made["qwen2_noshape"] = qwen2_source(models / "qwen2_noshape", drop="hidden_size")
    made["strbool"] = model_copy(TINY, models / "strbool", tie_word_embeddings="false")
    return made


RECIPE = """[model]
char_alphabet = "01234\\n"
hidden_size = 16
layers = 1
heads = 2
kv_heads = 2
context = 48
[data]
stage = "sft"
task = "sudoku4"
train = [{train}]
separator = "<|sep|>"
seq_len = 40
[optim]
max_steps = 2
batch_size = 4
warmup_steps = 0
[run]
out_dir = {out}
progress = false
"""


def model_copy(source: str, path: Path, **config) -> Path:
    """A copy of a model directory with some config.json values replaced."""
    shutil.copytree(source, path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, **config}))
    return path


def qwen2_source(path: Path, drop: str | None = None) -> Path:
    """A causal Qwen2 directory (what `dreamlm convert` reads), from the random tiny model; `drop` removes a key."""
    from dreamlm.model import DreamModel

    model = DreamModel.from_pretrained(TINY)
    model.config = dataclasses.replace(model.config, model_type="qwen2", causal=True, mask_token_id=None)
    model.save_pretrained(path)
    if drop:
        data = json.loads((path / "config.json").read_text())
        del data[drop]
        (path / "config.json").write_text(json.dumps(data))
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def cases(f: dict[str, Path]) -> list[list[str]]:
    """Every bad invocation, by verb: arguments out of range, bad paths and files, malformed puzzles."""
    under_file = str(f["text"] / "out.jsonl")  # a path whose parent is a file
    out: list[list[str]] = []
    numeric = {  # option -> bad values, for the sampling verbs
        "--steps": ["0", "-3"], "--eps": ["0", "1", "-0.5", "nan", "inf"], "--temperature": ["-1", "nan", "1e-300"],
        "--top-p": ["0", "1.5", "nan"], "--top-k": ["0", "-1"], "--alg": ["greedy", ""], "--alg-temp": ["-1", "nan"],
        "--seed": ["-1", str(2**64)], "--dtype": ["bogus", "int8"], "--device": ["banana", "meta", "cuda:7"],
    }
    for opt, values in numeric.items():
        for v in values:
            out.append(["generate", "Hello", "-m", TINY, opt, v])
            out.append(["infill", "a <|mask:3|> b", "-m", TINY, opt, v])
    for v in ["0", "-1", "100000"]:
        out.append(["generate", "Hello", "-m", TINY, "--max-new-tokens", v])
    out.append(["generate", "Hello", "-m", TINY, "--delay", "-1", "--show"])
    for prompt in ["", "   ", "<|foo|>", "Hello " * 400]:
        out.append(["generate", prompt, "-m", TINY])
    for template in ["no span here", "<|mask:0|> x", "<|mask:100000|>", "a <|mask:9999|> b", "<|bar|> <|mask|>"]:
        out.append(["infill", template, "-m", TINY])
    for model in [str(f["dir"]), str(f["empty_dir"]), str(f["text"]), str(f["badconfig"]), "/nonexistent/model"]:
        out.append(["generate", "Hello", "-m", model])
        out.append(["infill", "a <|mask|>", "-m", model])
        out.append(["info", model])
        out.append(["serve", model])
        out.append(["solve", "sudoku", "0403\n3042\n0234\n4001", "-m", model])
    for task in ["bogus", "star-0-5", "cd9", ""]:
        out.append(["data", task, "--out", str(f["dir"] / "new.jsonl"), "--n", "5"])
    for extra in (["--n", "0"], ["--n", "-1"], ["--seed", "-1"], ["--split", "bogus"], ["--workers", "0"],
                  ["--workers", "-2"], ["--out", str(f["dir"])], ["--out", under_file]):
        args = ["data", "sudoku4", "--n", "5", "--out", str(f["dir"] / "new.jsonl")]
        out.append(args[:-2] + extra if extra[0] == "--out" else args + extra)
    for extra in (["--vocab-size", "0"], ["--vocab-size", "10"], ["--data", "/nonexistent.txt"],
                  ["--data", str(f["emptyfile"])], ["--data", str(f["empty_dir"])], ["--data", str(f["notext"])]):
        out.append(["train-tokenizer", str(f["dir"] / "tok"), *extra])
    out.append(["train-tokenizer", str(f["text"]), "--vocab-size", "400", "--data", str(f["text"])])
    out.append(["convert", "/nonexistent", str(f["dir"] / "conv")])
    out.append(["convert", str(f["dir"]), str(f["dir"] / "conv")])
    out.append(["convert", TINY, TINY])
    out.append(["convert", TINY, str(f["dir"])])  # not empty: never overwritten
    out.append(["convert", TINY, under_file])
    out.append(["convert", str(f["text"]) + ".gguf", str(f["dir"] / "conv")])
    for extra in (["--type", "int8"], ["--type", ""]):
        out.append(["export", TINY, str(f["dir"] / "m.gguf"), *extra])
    out.append(["export", TINY, str(f["dir"])])  # a folder where the file goes
    out.append(["export", TINY, under_file])
    out.append(["export", "/nonexistent", str(f["dir"] / "m.gguf")])
    out.append(["export", str(f["badconfig"]), str(f["dir"] / "m.gguf")])
    out.append(["export", "sudoku4-ar", str(f["dir"] / "m.gguf")])  # causal: not a Dream model
    out.append(["pull", "bogus"])
    out.append(["pull", "smollm2", "--gguf", str(f["dir"])])  # refused before the cache is looked at
    out.append(["train", str(f["badtoml"])])
    out.append(["train", "--set", f"data.train={f['notext']}", "--max-steps", "1", "--out-dir", str(f["dir"] / "r")])
    out.append(["train", "/nonexistent.toml"])
    for setting in ["nosection=1", "optim.nope=1", "optim.max_steps=abc", "model.attention_bias=false",
                    "optim.lr=nan", "run.out_dir=", "data.fim_rate=2", "data.fim_rate=abc", "data.fim_rate=0.5",
                    "objective.span_rate=-1", "objective.span_rate=x", "run.export_format=hf",
                    "run.export_format=qwen2"]:
        out.append(["train", "--set", setting, "--max-steps", "1", "--out-dir", str(f["dir"] / "run")])
    out.append(["train", "--out-dir", str(f["text"]), "--max-steps", "1"])  # a file where the run folder goes
    out.append(["train-tokenizer", under_file, "--vocab-size", "400", "--data", str(f["text"])])
    for extra in (["--max-steps", "0"], ["--objective", "bogus"], ["--stage", "bogus"]):
        out.append(["train", "--out-dir", str(f["dir"] / "run"), *extra])
    sudoku_bad = ["12345", "0403\n3042\n0234", "0" * 17, "0" * 25, "abcd\nefgh\nijkl\nmnop", "0403\n3042\n0234\n4005",
                  "1111\n0000\n0000\n0000", "62,51|49,97/49,33="]
    for puzzle in sudoku_bad:
        out.append(["solve", "sudoku", puzzle])
    star_bad = ["1,2|2,3|3,1/1,3=", "1,2|1,3|2,4|3,4/1,4=", "1,2|3,2|1,3/1,2=", "1,2|2,3|2,4/1,3=", "1,2|2,3/3,1=",
                "1,2|2,3/1,9=", "1,2|2,3/1,3", "1,2,3/1,3=", "a,b/a,b=", "/1,2=", "1,2|2,3/1,2,3="]
    for puzzle in star_bad:
        out.append(["solve", "path", puzzle])
    for kind in ["bogus", "star-99-99", "sudoku16"]:
        out.append(["solve", kind, "0403\n3042\n0234\n4001"])
    for name in ["utf16", "binary", "numbers", "nulls", "notjson", "dir", "emptyfile"]:
        out.append(["solve", "sudoku", "--file", str(f[name])])
    puzzle = "0403\n3042\n0234\n4001"
    for extra in (["--steps", "0"], ["--steps", "-1"], ["--delay", "-1", "--show"], ["--out", str(f["dir"])],
                  ["--out", under_file], ["-m", str(BUNDLED["star-2-5-diffusion"])]):
        out.append(["solve", "sudoku", puzzle, *extra])
    out.append(["solve", "sudoku"])
    out.append(["solve", "sudoku", puzzle, "--file", str(f["bom"])])
    for extra in (["--n", "0"], ["--n", "-1"], ["--delay", "-1"]):
        out.append(["demo", *extra])
    for extra in (["--port", "-1"], ["--port", "70000"], ["--max-n", "0"], ["--timeout", "nan"], ["--timeout", "0"],
                  ["--log-level", "loud"], ["--max-body", "0"], ["--dtype", "bogus"], ["--device", "banana"],
                  ["--max-tokens", "-4"], ["--api-key", " "]):
        out.append(["serve", TINY, *extra])
    for extra in (["--n", "0"], ["--out", under_file]):
        out.append(["bench", "planning", *extra])
    for extra in (["--n", "0"], ["--per-forward", "0"], ["--hidden", "0"], ["--layers", "0"], ["--new-tokens", "0"],
                  ["--task", "bogus"], ["--dtype", "bogus"], ["--out", under_file]):
        out.append(["bench", "speed", *extra])
    for extra in (["--concurrency", "a"], ["--concurrency", "0"], ["--max-tokens", "0"], ["--temperature", "nan"],
                  ["-m", "/nonexistent"], ["--max-tokens", "16,x"], ["--max-tokens", "16,,32"], ["--max-tokens", ""],
                  ["--per-client", "0"], ["--threads", "0"]):
        out.append(["bench", "serve", *extra])
    for extra in (["--n", "0"], ["--blocks", "0"], ["--mc-num", "0"], ["--spans", "a"], ["--spans", "99"],
                  ["--spans", "-4"], ["--out", under_file], ["-m", "diffusion"], ["-m", "gpt=x"],
                  ["-m", "diffusion=/nonexistent"], ["-m", f"ar={TINY}"], ["-m", f"ar-fim={TINY}"],
                  ["-m", f"diffusion={f['text']}"], ["--seed", "-1"], ["--alg", "bogus"]):
        out.append(["bench", "infill", *extra])
    return out


PUZZLE = "0403\n3042\n0234\n4001"


def issue_cases(f: dict[str, Path]) -> list[list[str]]:
    """The cases of the second and third bad-input sweeps (issues 33 and 34), each as the user typed it."""
    recipe, runs = str(f["recipe"]), f["text"].parent / "runs"
    train = ["train", recipe, "--out-dir", str(runs / "new")]
    out = [
        ["solve", "sudoku", "--file", str(f["train"]), "--out", "/proc/version"],
        ["data", "sudoku4", "--n", "5", "--out", "/proc/version"],
        ["train", str(f["binary_recipe"])], ["train", str(f["latin1_recipe"])], ["train", str(f["utf16_recipe"])],
        ["train", recipe, "--out-dir", str(f["text"])], ["train", recipe, "--out-dir", "/proc/x"],
        ["train", recipe, "--out-dir", str(f["text"] / "run")],
        ["generate", "Hello", "-m", str(f["strbool"])], ["info", str(f["strbool"])],
        [*train, "--resume"],
        ["convert", str(f["qwen2"]), str(runs / "conv"), "--max-shard-size", "0"],
        ["convert", str(f["qwen2"]), "/proc/x"],
        ["convert", str(f["qwen2_noshape"]), str(runs / "conv")],
        ["eval", "-m", TINY, "--limit", "1", "-o", "/proc/version"],
        ["eval", "-m", TINY, "--limit", "1", "-o", str(f["dir"])],
        ["eval", "-m", TINY, "--limit", "1", "-o", str(f["text"] / "out.json")],
        ["eval", "-m", TINY, "--steps", "0"], ["eval", "-m", TINY, "--steps", "100000"],
        ["eval", "-m", TINY, "--batch-size", "0"], ["eval", "-m", TINY, "--mc-num", "0"],
        ["bench", "serve", "--max-tokens", "5000"], ["bench", "serve", "--temperature", "-1"],
        ["bench", "serve", "--temperature", "3"],
        ["bench", "serve", "--soak", "-1"], ["bench", "serve", "--soak", "nan"], ["bench", "serve", "--soak-clients", "0"],
        ["solve", "countdown", "a,b,c,d"],
        ["generate", "a\udcffb", "-m", TINY],  # an undecodable byte in argv
        ["infill", "a <|mask|> \ud800", "-m", TINY],
        ["train", str(f["section_toml"])],
    ]
    for data in ("latin1", "utf16text", "binary", "empty_dir"):
        out.append([*train, "--set", f"data.train={f[data]}"])
        out.append([*train, "--set", "data.stage=pretrain", "--set", "data.task=", "--set", f"data.train={f[data]}"])
    out.append([*train, "--set", f"data.valid={f['latin1']}"])
    for setting in ("optim.beta1=2.0", "optim.beta2=-0.1", "optim.weight_decay=-1", "run.keep_checkpoints=-1",
                    "run.stop_at=-3", f"optim.max_steps={10**23}", "optim.max_steps=2000000000",
                    "optim.batch_size=100000000", "model.hidden_size=1000000", "optim.lr=inf", "run.seed=-1",
                    "objective.cart_p=2", "model.kv_heads=3", "run.eval_batches=0"):
        out.append([*train, "--set", setting])
    import torch

    if not torch.cuda.is_available():  # a CPU build (or a machine without a GPU)
        out.append([*train, "--set", "run.device=cuda"])
    for verb in (["generate", "Hello", "-m", TINY], ["infill", "a <|mask:2|> b", "-m", TINY],
                 ["solve", "sudoku", PUZZLE]):
        out.append([*verb, "--steps", "100000"])
    return out


def check(args: list[str], root: Path) -> str | None:
    """None when the command failed cleanly, else what went wrong."""
    before = snapshot(root)
    result = runner.invoke(app, args)
    problems = []
    if result.exit_code != 2:
        problems.append(f"exit {result.exit_code}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"traceback: {type(result.exception).__name__}: {str(result.exception)[:120]}")
    text = result.stderr.strip()
    if "Traceback" in text:
        problems.append("traceback in stderr")
    if text.startswith("error:") and len(text.splitlines()) != 1:
        problems.append(f"{len(text.splitlines())} lines")
    if not text.startswith("error:") and "Usage:" not in text and result.exit_code != 0 and not problems:
        problems.append(f"unclear message: {text[:120]!r}")
    if snapshot(root) != before:
        problems.append("changed the user's files")
    return "; ".join(problems) or None


def test_every_bad_invocation_fails_cleanly(files):
    root = files["text"].parent
    all_cases = cases(files) + issue_cases(files)
    assert len(all_cases) >= 270
    failures = []
    for args in all_cases:
        problem = check(args, root)
        if problem:
            failures.append(f"{' '.join(a if len(a) < 40 else a[:37] + '...' for a in args)!r}: {problem}")
    assert not failures, f"{len(failures)} of {len(all_cases)} cases:\n" + "\n".join(failures)


PUZZLE_CHARS = st.text(alphabet="0123456789,|/=\n ab-", max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(kind=st.sampled_from(["sudoku", "path", "countdown"]), puzzle=PUZZLE_CHARS)
def test_generated_puzzles_are_accepted_or_refused_in_one_line(kind, puzzle):
    from dreamlm.errors import DreamError
    from dreamlm.solver import normalise_puzzle, resolve_task
    from dreamlm.tasks import get_task

    text = normalise_puzzle(puzzle)
    try:  # the parser accepts the puzzle or says why in one line; any other exception fails the test
        get_task(resolve_task(kind, text)).check_input(text)
    except DreamError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(puzzle=st.text(alphabet="0123456789,|/=", min_size=5, max_size=40))
def test_generated_star_graphs_run_through_solve_cleanly(puzzle):
    result = runner.invoke(app, ["solve", "path", puzzle])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 2)
    if result.exit_code == 2:
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_json_output_is_only_json():
    result = runner.invoke(app, ["solve", "sudoku", "0403\n3042\n0234\n4001", "--json"])
    assert result.exit_code == 0
    assert isinstance(json.loads(result.stdout), (list, dict))


def test_a_sudoku_without_a_solution_says_so_and_a_wrong_model_is_refused():
    result = runner.invoke(app, ["solve", "sudoku", "0000\n0000\n0004\n1302"])  # no clash, but no solution
    assert result.exit_code == 0 and "invalid: breaks the rules (this puzzle has no solution)" in result.stdout
    result = runner.invoke(app, ["solve", "sudoku", "0403\n3042\n0234\n4001", "-m", str(BUNDLED["star-2-5-diffusion"])])
    assert result.exit_code == 2 and "was trained on star-2-5 puzzles; it cannot solve sudoku4" in result.stderr
    result = runner.invoke(app, ["solve", "sudoku", "0" * 17])
    assert result.exit_code == 2 and "this one has 17" in result.stderr


def test_version_and_help_list_every_verb():
    assert runner.invoke(app, ["--version"]).stdout.startswith("dreamlm ")
    text = runner.invoke(app, ["--help"]).stdout
    for verb in ("generate", "infill", "info", "train", "data", "train-tokenizer", "convert", "export", "solve", "demo",
                 "serve", "bench", "pull"):
        assert f" {verb} " in text


def test_show_with_json_keeps_stdout_pure_json():
    result = runner.invoke(app, ["solve", "sudoku", "0403\n3042\n0234\n4001", "--show", "--json", "--delay", "0"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)[0]["valid"] is True  # the live view went to stderr


def test_infill_expands_a_typed_newline_and_drops_the_bos_it_added():
    result = runner.invoke(app, ["infill", "<|mask:2|> x\\ny", "-m", TINY, "--json"])
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["text"].endswith(" x\ny") and not body["text"].startswith("<|endoftext|>")


def test_an_interrupted_solve_file_keeps_what_it_solved(tmp_path, monkeypatch):
    import dreamlm.solver as solver_module
    from dreamlm.tasks import make_examples

    puzzles = tmp_path / "in.jsonl"
    puzzles.write_text("".join(json.dumps({"input": e["input"]}) + "\n" for e in make_examples("sudoku4", 100, 5)))
    real, calls = solver_module.Solver.solve, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second chunk of 64
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(solver_module.Solver, "solve", interrupted)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["solve", "sudoku", "--file", str(puzzles), "--out", str(out)])
    assert result.exit_code == 130 and "64 puzzles solved so far" in result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 64 and [x["input"] for x in lines] == [e["input"] for e in make_examples("sudoku4", 64, 5)]
    assert not list(tmp_path.glob("*.partial"))


# ---- the sweeps' cases, by message -------------------------------------------------------------------------------
def refusal(args: list[str], **kwargs) -> str:
    """The one error line of a refused invocation (exit 2, no traceback)."""
    result = runner.invoke(app, args, **kwargs)
    assert result.exit_code == 2, (args, result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_each_sweep_case_says_what_is_wrong(files):
    recipe, runs = str(files["recipe"]), files["text"].parent / "runs"
    train = ["train", recipe, "--out-dir", str(runs / "new")]
    assert refusal(["data", "sudoku4", "--n", "5", "--out", "/proc/version"]) == \
        "cannot write /proc/version: /proc does not accept new files"
    assert refusal(["train", recipe, "--out-dir", str(files["text"])]) == f"{files['text']} is a file, not a folder"
    assert "holds NUL bytes" in refusal(["train", str(files["binary_recipe"])])
    assert refusal(["train", str(files["utf16_recipe"])]) == f"{files['utf16_recipe']} is UTF-16 text; save it as UTF-8"
    assert "(byte 0xe9 at offset 20; Latin-1" in refusal(["train", str(files["latin1_recipe"])])
    assert refusal(["generate", "Hello", "-m", str(files["strbool"])]) == \
        "config: tie_word_embeddings must be true or false, got 'false'"
    assert refusal([*train, "--resume"]) == \
        f"--resume: {runs / 'new'} holds no checkpoint to continue; drop --resume to start a new run"
    assert refusal(["convert", str(files["qwen2"]), str(runs / "c"), "--max-shard-size", "0"]) == \
        "max_shard_size must be at least one byte, got '0'"
    assert "has no hidden_size; it must give the model's shape" in \
        refusal(["convert", str(files["qwen2_noshape"]), str(runs / "c")])
    assert refusal(["eval", "-m", TINY, "--steps", "0"]) == "--steps must be >= 1, got 0"
    assert refusal(["generate", "Hi", "-m", TINY, "--steps", "100000"]) == \
        "--steps must be at most 2048 (dreamlm serve's cap too), got 100000"
    assert refusal([*train, "--set", "optim.batch_size=100000000"]).startswith(
        "train config: this run needs at least 238.4 GiB (16-wide model at 16 bytes per parameter for weights, "
        "gradients and AdamW, plus the fp32 logits of optim.batch_size=100000000 x data.seq_len=40 x vocab 16)")
    assert refusal([*train, "--set", f"optim.max_steps={10**23}"]) == \
        f"train config: optim.max_steps={10**23} is too large (integers must be below 2**63)"
    assert refusal([*train, "--set", "run.stop_at=-3"]) == \
        "train config: run.stop_at must be >= 0 (0 = never stop early)"
    assert refusal([*train, "--set", f"data.train={files['empty_dir']}"]) == \
        f"data folder {files['empty_dir']} holds no files"
    assert refusal(["train", str(files["section_toml"])]) == "train config: unknown section [bogus]"  # not markup
    assert refusal(["solve", "countdown", "a,b,c,d"]).startswith("a countdown puzzle must be comma-separated")
    assert "lone UTF-16 surrogate ('\\udcff' at character 1)" in refusal(["generate", "a\udcffb", "-m", TINY])
    assert refusal(["bench", "serve", "--max-tokens", "5000"]) == \
        "--max-tokens must be at most 76 (the server's cap of 1024 and this model's context of 256 less the " \
        "longest prompt), got 5000"
    assert not (runs / "new").exists() and not (runs / "c").exists()


def test_a_bracketed_data_list_is_a_list_not_a_glob(files):
    from dreamlm.training.config import TrainConfig

    for raw in (f'["{files["train"]}", "{files["text"]}"]', f"[{files['train']}, {files['text']}]"):
        assert TrainConfig.load(files["recipe"], [f"data.train={raw}"]).data.train == \
            [str(files["train"]), str(files["text"])]
    with pytest.raises(DreamError, match="bad value"):
        TrainConfig.load(files["recipe"], ["data.train=[1, 2]"])


def test_serve_refuses_an_empty_key_variable_and_a_busy_port_and_warns_when_exposed(monkeypatch):
    import uvicorn

    assert refusal(["serve", TINY], env={"DREAMLM_API_KEY": ""}) == \
        "DREAMLM_API_KEY is set but empty; set it to a key, or unset it to serve without one"
    assert refusal(["serve", TINY, "--api-key", ""]) == "the API key is empty"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert refusal(["serve", TINY, "--port", str(port)], env={"DREAMLM_API_KEY": None}) == \
            f"cannot listen on 127.0.0.1:{port}: Address already in use (another server is using the port; choose " \
            "another with --port)"
    served = []

    def run(self, sockets=None):  # stands in for the server loop: the sockets it was given, then "stopped"
        served.append(sockets[0].getsockname())
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                              ("localhost", None, False)):
        keyed = ["--api-key", key] if key else []
        result = runner.invoke(app, ["serve", TINY, "--host", host, "--port", "0", *keyed],
                               env={"DREAMLM_API_KEY": None})
        assert result.exit_code == 0, result.stderr
        assert ("warning: " in result.stderr) == warned, (host, key, result.stderr)
        assert result.stderr.index("serving") > (result.stderr.find("warning") if warned else -1)
    assert [address[0] for address in served] == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "127.0.0.1"]


# ---- the Python API: DreamError, never a raw exception -----------------------------------------------------------
def test_the_python_api_refuses_bad_calls_with_dream_errors(tmp_path):
    import torch

    from dreamlm.model import DreamModel
    from dreamlm.sampling import Constraints, diffusion_generate, infill, json_template

    model = DreamModel.from_pretrained(TINY)
    tok, vocab = model.tokenizer, model.config.vocab_size
    ids = torch.tensor([tok.encode("Hello there")])
    (tmp_path / "file").write_text("keep")
    calls = [
        (lambda: DreamModel.from_pretrained(None), "the model directory must be a path"),
        (lambda: DreamModel.from_pretrained(123), "the model directory must be a path"),
        (lambda: DreamModel.from_pretrained(TINY, device="banana"), "unknown device 'banana'"),
        (lambda: DreamModel.from_pretrained(TINY, dtype=5), "unknown dtype 5"),
        (lambda: infill(model, tok, None), "the template must be a string"),
        (lambda: infill(model, tok, "a <|mask:3|> b", steps=0), "steps must be an integer >= 1"),
        (lambda: json_template(["a", 3]), "json_template takes a dict"),
        (lambda: json_template({"a": -1}), "'a' needs 1..4096 tokens, got -1"),
        (lambda: json_template({"a": True}), "must be a token count (int) or fixed text (str)"),
        (lambda: diffusion_generate(model, ids, max_new_tokens=4, constraints=Constraints(pinned={0: 5})),
         "pinned position 0 is a prompt token"),
        (lambda: diffusion_generate(model, ids, max_new_tokens=4,
                                    constraints=Constraints(banned_token_ids=list(range(vocab)))),
         "leaves no token the sampler may write"),
        (lambda: model(torch.tensor([[vocab + 5]])), f"input_ids holds {vocab + 5}, which is not a token id"),
        (lambda: model(torch.tensor([[-1]])), "input_ids holds -1"),
        (lambda: model(torch.tensor([[1.0]])), "input_ids must be a (batch, length) tensor of token ids"),
        (lambda: model.save_pretrained(tmp_path / "file"), "is a file, not a folder"),
        (lambda: model.save_pretrained(tmp_path / "file" / "sub"), "is a file, not a folder"),
        (lambda: model.save_pretrained("/proc/x"), "/proc does not accept new files"),
        (lambda: tok.encode("a\ud800"), "lone UTF-16 surrogate"),
    ]
    for call, message in calls:
        with pytest.raises(DreamError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert (tmp_path / "file").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---- HTTP: lone surrogates in every text field, and more prompts than the queue ------------------------------------
@pytest.fixture(scope="module")
def http(one_click_command):
    from fastapi.testclient import TestClient

    from dreamlm.serve import Limits, create_app, load_models
    from dreamlm.serve.local import model_paths

    limits = Limits(max_tokens=32, max_n=2, max_steps=64, timeout=30)
    with TestClient(create_app(load_models(model_paths("tiny-dream"), limits), limits)) as client:
        yield client


def with_lone_surrogate(text: str, position: int, code: int) -> str:
    position = min(position, len(text))
    return text[:position] + chr(code) + text[position:]


TEXT_FIELDS = {  # where a string goes in a request, and the parameter the 400 names
    "completion prompt": ("/v1/completions", lambda s: {"prompt": s}, "prompt"),
    "completion prompt list": ("/v1/completions", lambda s: {"prompt": ["fine", s]}, "prompt"),
    "template prompt": ("/v1/completions", lambda s: {"prompt": s + " <|mask:2|>"}, "prompt"),
    "suffix": ("/v1/completions", lambda s: {"prompt": "a", "suffix": s}, "suffix"),
    "stop": ("/v1/completions", lambda s: {"prompt": "a", "stop": s}, "stop"),
    "stop list": ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": "a"}], "stop": ["x", s]},
                  "stop"),
    "user": ("/v1/completions", lambda s: {"prompt": "a", "user": s}, "user"),
    "model": ("/v1/completions", lambda s: {"prompt": "a", "model": "tiny-dream" + s}, "model"),
    "chat content": ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": s}]}, "messages"),
    "chat content part": ("/v1/chat/completions",
                          lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]},
                          "messages"),
    "chat name": ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": "a", "name": s}]},
                  "messages"),
    "system message": ("/v1/chat/completions", lambda s: {"messages": [{"role": "system", "content": s},
                                                                       {"role": "user", "content": "a"}]}, "messages"),
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(field=st.sampled_from(sorted(TEXT_FIELDS)), text=st.text(max_size=12), position=st.integers(0, 12),
       code=st.integers(0xD800, 0xDFFF), stream=st.booleans())
def test_a_lone_surrogate_in_any_text_field_is_a_400(http, field, text, position, code, stream):
    path, build, param = TEXT_FIELDS[field]
    fields = build(with_lone_surrogate(text, position, code))
    body = {"model": "tiny-dream", "max_tokens": 2, "stream": stream, **fields}
    if "<|mask" in json.dumps(body.get("prompt", "")):
        body.pop("max_tokens")
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})  # "\ud8xx" escapes
    assert r.status_code == 400, (field, r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "lone UTF-16 surrogate" in error["message"] and "\n" not in error["message"]


def test_more_prompts_than_the_queue_holds_is_a_400_naming_the_limit(http):
    r = http.post("/v1/completions", json={"model": "tiny-dream", "prompt": [f"p{i}" for i in range(257)],
                                           "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["message"] == ("the request has 257 prompts, more than this server queues per model "
                                            "(256, serve --max-queue); send them in smaller requests")
    assert http.post("/v1/completions", json={"model": "tiny-dream", "prompt": ["a", "b"], "max_tokens": 1,
                                              "seed": 0}).status_code == 200


# ---- generated: every class, for every verb that writes or reads ---------------------------------------------------
NAMES = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=10).filter(
    lambda n: n not in {".", ".."})


def writers(f: dict[str, Path]) -> dict[str, tuple[str, object]]:
    """Every verb that writes, with what its output is ("file" or "folder") and its arguments around OUT."""
    return {
        "data": ("file", lambda out: ["data", "sudoku4", "--n", "5", "--out", out]),
        "solve": ("file", lambda out: ["solve", "sudoku", PUZZLE, "--out", out]),
        "eval": ("file", lambda out: ["eval", "-m", TINY, "--limit", "1", "-o", out]),
        "train": ("folder", lambda out: ["train", str(f["recipe"]), "--out-dir", out]),
        "train-tokenizer": ("folder", lambda out: ["train-tokenizer", out, "--data", str(f["text"]),
                                                   "--vocab-size", "300"]),
        "convert": ("folder", lambda out: ["convert", str(f["qwen2"]), out]),
        "export": ("file", lambda out: ["export", TINY, out, "--type", "f32"]),
        "bench planning": ("folder", lambda out: ["bench", "planning", "--n", "1", "--out", out]),
        "bench speed": ("folder", lambda out: ["bench", "speed", "--n", "1", "--out", out]),
        "bench infill": ("folder", lambda out: ["bench", "infill", "--n", "1", "--out", out]),
        "bench serve": ("folder", lambda out: ["bench", "serve", "--out", out]),
        "save_pretrained (API)": ("folder", None),
    }


def unwritable(f: dict[str, Path], kind: str):
    """Output paths that cannot be written, for a file or a folder: what is there already has the wrong kind, a
    file stands where a folder must be, or the folder is /proc."""
    under_file = NAMES.map(lambda n: str(f["text"] / n))
    in_proc = st.tuples(NAMES, NAMES).map(lambda p: f"/proc/{p[0]}/{p[1]}")
    wrong_kind = st.sampled_from([str(f["dir"]), str(f["empty_dir"])] if kind == "file" else
                                 [str(f["text"]), str(f["train"]), "/dev/null"])
    return st.one_of(wrong_kind, under_file, in_proc, st.just("/proc/version"), NAMES.map(lambda n: f"/proc/{n}"))


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(data=st.data())
def test_generated_unwritable_outputs_fail_before_any_work(files, data):
    from dreamlm.model import DreamModel

    verb = data.draw(st.sampled_from(sorted(writers(files))))
    kind, build = writers(files)[verb]
    out = data.draw(unwritable(files, kind))
    root, before, existed = files["text"].parent, snapshot(files["text"].parent), Path(out).exists()
    began = time.perf_counter()
    if build is None:
        with pytest.raises(DreamError):
            DreamModel.from_pretrained(TINY).save_pretrained(out)
    else:
        problem = check(build(out), root)
        assert problem is None, (verb, out, problem)
    assert time.perf_counter() - began < 30, "refused only after work"
    assert snapshot(root) == before
    assert Path(out).exists() == existed, "created the output"


def text_of(kind: str):
    """File contents that are not UTF-8 text (or nothing at all)."""
    ascii_text = st.text(alphabet=string.ascii_letters + string.digits + ' {}":,\n', max_size=30)
    return {
        "binary": st.binary(max_size=48).map(lambda b: b + b"\x00\xff\xfe" + b),
        "latin-1": st.tuples(ascii_text, st.sampled_from("éàüßñçøÉ"), ascii_text).map(
            lambda t: "".join(t).encode("latin-1")),
        "utf-16": st.tuples(ascii_text, st.booleans()).map(lambda t: t[0].encode("utf-16" if t[1] else "utf-16-be")
                                                            if t[1] or t[0] else b"\xfe\xff"),
        "empty": st.just(b""),
    }[kind]


def readers(f: dict[str, Path]) -> dict[str, tuple[object, tuple[str, ...]]]:
    """Every file the CLI reads: how to place a bad one (tmp folder, bytes -> arguments), and which contents are
    wrong for it (an empty merges.txt is a valid tokenizer without merges)."""
    def alone(name: str, args):
        def place(tmp: Path, data: bytes) -> list[str]:
            (tmp / name).write_bytes(data)
            return args(tmp, str(tmp / name))
        return place

    def in_model(source: str, name: str, args):
        def place(tmp: Path, data: bytes) -> list[str]:
            shutil.copytree(source, tmp / "model")
            (tmp / "model" / name).write_bytes(data)
            return args(str(tmp / "model"))
        return place

    train = lambda tmp, *sets: ["train", str(f["recipe"]), "--out-dir", str(tmp / "run"),
                                *[a for s in sets for a in ("--set", s)]]
    generate = lambda model: ["generate", "Hello", "-m", model, "--max-new-tokens", "2"]
    solve = lambda model: ["solve", "sudoku", PUZZLE, "-m", model]
    every = ("binary", "latin-1", "utf-16", "empty")
    return {
        "recipe": (alone("r.toml", lambda tmp, p: ["train", p, "--out-dir", str(tmp / "run")]), every),
        "sft data": (alone("d.jsonl", lambda tmp, p: train(tmp, f"data.train={p}")), every),
        "validation data": (alone("v.jsonl", lambda tmp, p: train(tmp, f"data.valid={p}")), every),
        "text data": (alone("d.txt", lambda tmp, p: train(tmp, "data.stage=pretrain", "data.task=",
                                                         f"data.train={p}")), every),
        "tokenizer data": (alone("d.txt", lambda tmp, p: ["train-tokenizer", str(tmp / "tok"), "--data", p,
                                                          "--vocab-size", "300"]), every),
        "puzzle file": (alone("p.jsonl", lambda tmp, p: ["solve", "sudoku", "--file", p]), every),
        "gguf": (alone("m.gguf", lambda tmp, p: ["convert", p, str(tmp / "out")]), every),
        "adapter config": (alone("adapter_config.json", lambda tmp, p: generate(str(tmp))), every),
        "config.json": (in_model(TINY, "config.json", generate), every),
        "vocab.json": (in_model(TINY, "vocab.json", generate), every),
        "merges.txt": (in_model(TINY, "merges.txt", generate), every[:3]),
        "tokenizer_config.json": (in_model(TINY, "tokenizer_config.json", generate), every),
        "weights": (in_model(TINY, "model.safetensors", generate), every),
        "weight index": (in_model(TINY, "model.safetensors.index.json", generate), every),
        "tokenizer.json": (in_model(SUDOKU, "tokenizer.json", solve), every),
        "task file": (in_model(SUDOKU, "dreamlm_task.json", solve), every),
        "AR config.json (convert)": (in_model(str(f["qwen2"]), "config.json",
                                              lambda m: ["convert", m, str(Path(m).parent / "out")]), every),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(data=st.data())
def test_generated_unreadable_input_files_are_refused_in_one_line(files, data):
    role = data.draw(st.sampled_from(sorted(readers(files))))
    place, kinds = readers(files)[role]
    kind = data.draw(st.sampled_from(kinds))
    content = data.draw(text_of(kind))
    with tempfile.TemporaryDirectory() as tmp:
        args = place(Path(tmp), content)
        problem = check(args, Path(tmp))
        assert problem is None, (role, kind, content[:40], problem)
        assert not {"run", "out", "tok"} & {p.name for p in Path(tmp).iterdir()}, "wrote output"


def bad_config_value(key: str):
    """A value that config.json's `key` can never hold: the wrong JSON type (a boolean written as a string, a
    fraction for a count, ...), or out of range (negative counts, ids past the vocabulary, huge shapes)."""
    from dreamlm.config import FIELD_TYPES

    kinds = FIELD_TYPES[key]
    wrong_type = st.one_of(st.text(max_size=6), st.sampled_from(["false", "true", "0", "1"]), st.booleans(),
                           st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
                           st.integers(-5, 10**6), st.none(), st.lists(st.integers(0, 3), max_size=2)).filter(
        lambda v: not (isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))))
    ranges = {"ids": st.one_of(st.integers(max_value=-1), st.integers(min_value=512, max_value=2**70)),
              "shape": st.one_of(st.integers(max_value=0), st.integers(min_value=2**20, max_value=2**100)),
              "positive": st.one_of(st.floats(max_value=0), st.just(float("nan")))}
    group = ("ids" if key.endswith("_token_id") else
             "shape" if key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads") else
             "positive" if key in ("rope_theta", "rms_norm_eps") else None)
    if key in ("eos_token_id",):  # a list of ids is Qwen2.5's way of naming several (the first is used)
        wrong_type = wrong_type.filter(lambda v: not (isinstance(v, list) and v))
    return st.one_of(wrong_type, ranges[group]) if group else wrong_type


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(data=st.data())
def test_generated_bad_model_config_values_are_refused_before_loading(data):
    from dreamlm.config import FIELD_TYPES

    key = data.draw(st.sampled_from(sorted(FIELD_TYPES)))
    value = data.draw(bad_config_value(key))
    with tempfile.TemporaryDirectory() as tmp:
        model = model_copy(TINY, Path(tmp) / "m", **{key: value})
        for args in (["generate", "Hello", "-m", str(model), "--max-new-tokens", "2"], ["info", str(model)]):
            if args[0] == "info" and not isinstance(value, type(None)) and isinstance(value, int) and key in (
                    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers") and value > 0:
                continue  # info reads headers only: a config shape that the weights contradict is generate's to find
            problem = check(args, Path(tmp))
            assert problem is None, (key, value, args[0], problem)


def train_keys() -> dict[str, type]:
    from dreamlm.training.config import TrainConfig

    cfg = TrainConfig()
    return {f"{s.name}.{k.name}": typing.get_type_hints(type(getattr(cfg, s.name)))[k.name]
            for s in dataclasses.fields(cfg) for k in dataclasses.fields(getattr(cfg, s.name))}


LOWER = {"data.seq_len": 2, "optim.max_steps": 1, "optim.batch_size": 1, "optim.grad_accum": 1,
         "optim.warmup_steps": 0, "run.log_every": 1, "run.eval_every": 1, "run.save_every": 1, "run.eval_solve": 0,
         "run.keep_checkpoints": 1, "run.stop_at": 0, "run.seed": 0, "run.eval_batches": 1, "model.hidden_size": 1,
         "model.layers": 1, "model.heads": 1, "model.kv_heads": 1, "model.intermediate_size": 0, "model.context": 2,
         "adapter.rank": 1, "optim.lr": 0, "optim.weight_decay": 0, "optim.clip": 0, "optim.beta1": 0,
         "optim.beta2": 0, "optim.min_lr_ratio": 0, "model.init_std": 0, "data.fim_rate": 0,
         "objective.span_rate": 0, "run.time_budget_s": 0, "objective.eps": 0, "objective.cart_p": 0,
         "objective.focal_gamma": 0, "adapter.alpha": 0}
UPPER = {"optim.beta1": 1, "optim.beta2": 1, "optim.min_lr_ratio": 1, "model.init_std": 1, "data.fim_rate": 1,
         "objective.span_rate": 1, "objective.eps": 1, "objective.cart_p": 1}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(data=st.data())
def test_generated_bad_train_config_values_are_refused(files, data):
    from dreamlm.training.config import MAX_COUNT, TrainConfig

    keys = train_keys()
    key = data.draw(st.sampled_from(sorted(keys)))
    kind = keys[key]
    wrong = {bool: st.one_of(st.sampled_from(["false", "true", "yes", "0"]), st.integers(0, 1), st.floats()),
             int: st.one_of(st.text(max_size=4), st.booleans(), st.integers(min_value=2**63, max_value=2**80),
                            st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))),
             float: st.one_of(st.text(max_size=4).filter(lambda t: not t.strip()), st.booleans(),
                              st.sampled_from([float("nan"), float("inf"), -float("inf")])),
             str: st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2))}.get(
        kind, st.one_of(st.text(max_size=4), st.integers(), st.lists(st.integers(), min_size=1, max_size=2)))
    options = [wrong]
    if key in LOWER:  # below the range ([lo, ...) for counts; (lo, ...) for the positive reals)
        low = LOWER[key]
        options.append(st.integers(max_value=low - 1) if kind is int else
                       st.floats(max_value=low, exclude_max=low == 0 and key in ("optim.weight_decay", "optim.clip",
                                 "optim.beta1", "optim.beta2", "optim.min_lr_ratio", "data.fim_rate",
                                 "objective.span_rate", "run.time_budget_s", "objective.focal_gamma"), allow_nan=False,
                                 allow_infinity=False))
    if key in UPPER:
        options.append(st.floats(min_value=UPPER[key], max_value=1e300, exclude_min=key == "model.init_std"))
    if kind is int and key.split(".")[1] in ("max_steps", "warmup_steps", "batch_size", "grad_accum", "log_every",
                                             "eval_every", "eval_batches", "save_every", "keep_checkpoints", "stop_at"):
        options.append(st.integers(MAX_COUNT + 1, 2**62))
    value = data.draw(st.one_of(options))
    section, name = key.split(".")
    # typed as --set key=value: only numbers keep their meaning as text (any text is a valid string or list)
    as_text = data.draw(st.booleans()) and kind in (int, float) and type(value) in (int, float)
    with pytest.raises(DreamError) as caught:
        if as_text:  # the same value typed as --set section.key=value
            TrainConfig.load(files["recipe"], [f"{key}={value}"])
        else:
            table = {"data": {"train": ["x.jsonl"]}}
            table.setdefault(section, {})[name] = value
            TrainConfig.from_dict(table).validate()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("eos", [[], [1, "2"], [True], [-1]])
def test_an_eos_list_that_is_not_token_ids_is_refused(eos):
    from dreamlm.config import DreamConfig

    with pytest.raises(DreamError, match="eos_token_id must be a token id or a non-empty list"):
        DreamConfig.from_dict({"model_type": "Dream", "eos_token_id": eos})
    assert DreamConfig.from_dict({"model_type": "Dream", "eos_token_id": [7, 8]}).eos_token_id == 7  # Qwen2.5's list: the first ends text


@pytest.mark.parametrize("args, message", [
    (["--n", "-1"], "--n must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--per-step", "a,b"], "--per-step must be comma-separated integers"),
    (["--per-step", "0"], "every --per-step value must be >= 1"),
    (["--per-step", "5"], "divide --max-new-tokens (64)"),
    (["--alg", "nope"], "alg"),
    (["-m", "smollm2"], "dreamlm pull smollm2"),  # the test run's model cache is empty
])
def test_bench_chat_refuses_bad_options_before_loading(args, message, tmp_path):
    assert message in refusal(["bench", "chat", "--out", str(tmp_path / "o"), *args])
    assert not (tmp_path / "o").exists()


def test_bench_chat_refuses_an_unwritable_out_before_loading(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    assert refusal(["bench", "chat", "--out", str(target)])
    assert target.read_text() == "keep"
