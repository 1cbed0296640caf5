"""Bad input across every CLI verb: a non-zero exit (2), no traceback, one line naming the problem (or click's own
usage message for a value of the wrong type), and no file the user had is changed. Generated where possible."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dreamlm.cli import app
from dreamlm.serve.app import bundled_models

runner = CliRunner()
BUNDLED = {p.name: p for p in bundled_models()}
SUDOKU = str(BUNDLED["sudoku4-diffusion"])
TINY = str(BUNDLED["tiny-dream"])


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
    return made


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
                  ["-m", "/nonexistent"]):
        out.append(["bench", "serve", *extra])
    for extra in (["--n", "0"], ["--blocks", "0"], ["--mc-num", "0"], ["--spans", "a"], ["--spans", "99"],
                  ["--spans", "-4"], ["--out", under_file], ["-m", "diffusion"], ["-m", "gpt=x"],
                  ["-m", "diffusion=/nonexistent"], ["-m", f"ar={TINY}"], ["-m", f"ar-fim={TINY}"],
                  ["-m", f"diffusion={f['text']}"], ["--seed", "-1"], ["--alg", "bogus"]):
        out.append(["bench", "infill", *extra])
    return out


def check(args: list[str], root: Path) -> str | None:
    """None when the command failed cleanly, else what went wrong."""
    before = snapshot(root)
    result = runner.invoke(app, args)
    problems = []
    if result.exit_code == 0:
        problems.append("exit 0")
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
    all_cases = cases(files)
    assert len(all_cases) >= 180
    failures = []
    for args in all_cases:
        problem = check(args, root)
        if problem:
            failures.append(f"{' '.join(a if len(a) < 40 else a[:37] + '...' for a in args)!r}: {problem}")
    assert not failures, f"{len(failures)} of {len(all_cases)} cases:\n" + "\n".join(failures)


PUZZLE_CHARS = st.text(alphabet="0123456789,|/=\n ab-", max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
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


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
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
    for verb in ("generate", "infill", "info", "train", "data", "train-tokenizer", "convert", "solve", "demo", "serve",
                 "bench", "pull"):
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
