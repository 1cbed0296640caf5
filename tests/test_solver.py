"""Solving puzzles: the solver interface, `dreamlm solve` / `data` on a tiny random planning model, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.solver import Solver, normalise_puzzle, resolve_task, write_task_file
from dreamlm.tasks import get_task
from dreamlm.training.data import char_tokenizer

runner = CliRunner()


def planning_model(path, task="sudoku4", causal=False, seq_len=40):
    tok = char_tokenizer(get_task(task).alphabet)
    config = DreamConfig(vocab_size=16 if task == "sudoku4" else 24, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, causal=causal)
    DreamModel(config).init_weights(0).save_pretrained(path, tokenizer=tok)
    write_task_file(path, task, seq_len, "<|sep|>", "test fixture")
    return path


@pytest.fixture(scope="module")
def sudoku_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("planning")
    return planning_model(root / "diff"), planning_model(root / "ar", causal=True)


PUZZLE = "0042\n2031\n4023\n3214"
SOLUTION = "1342\n2431\n4123\n3214"  # the only one: a right answer is exactly this grid


def sudoku4_by_the_rules(puzzle: str, answer: str) -> bool:
    """An independent check: givens kept, every row, column and 2x2 box a permutation of 1-4."""
    grid = answer.split("\n")
    if len(grid) != 4 or any(len(r) != 4 or set(r) - set("1234") for r in grid):
        return False
    if any(p not in "0" + a for p, a in zip(puzzle.replace("\n", ""), answer.replace("\n", ""))):
        return False
    units = grid + ["".join(r[c] for r in grid) for c in range(4)]
    units += [grid[r][c:c + 2] + grid[r + 1][c:c + 2] for r in (0, 2) for c in (0, 2)]
    return all(sorted(u) == list("1234") for u in units)


def forcing(solver, answer: str):
    """A tokens hook that writes `answer` + EOS right after the prompt, whatever the model says."""
    ids = torch.tensor(solver.tok.encode(answer) + [solver.model.config.eos_token_id])
    start = {}

    def hook(i, x, logits):
        if i is None:
            start["at"] = int((x[0] == solver.model.config.mask_token_id).nonzero()[0])
        x[:, start["at"]:start["at"] + len(ids)] = ids
        return x
    return hook


def test_solver_reports_validity_by_the_rules(sudoku_dirs):
    diffusion, ar = Solver(sudoku_dirs[0]), Solver(sudoku_dirs[1])
    [right] = diffusion.solve([PUZZLE], hook=forcing(diffusion, SOLUTION))
    assert right.output == SOLUTION and right.valid is True and right.input == PUZZLE
    [wrong] = diffusion.solve([PUZZLE], hook=forcing(diffusion, "2341\n2431\n4123\n3214"))
    assert wrong.output == "2341\n2431\n4123\n3214" and wrong.valid is False
    [guess] = ar.solve([PUZZLE])  # a random AR model: whatever it writes, valid exactly when it is the solution
    assert guess.valid == (guess.output == SOLUTION) and guess.forward_passes >= 1
    assert diffusion.kind == "diffusion" and ar.kind == "ar"


def test_malformed_puzzles_are_refused(sudoku_dirs):
    solver = Solver(sudoku_dirs[0])
    for bad, message in [("0042\n2031\n4023", ""), ("0042\n2031\n40x3\n3214", ""), ("1142\n2031\n4023\n3214", "")]:
        with pytest.raises(DreamError):
            solver.solve([bad])


def test_resolve_task_and_normalise():
    assert resolve_task("sudoku", "0" * 81) == "sudoku9" and resolve_task("sudoku", PUZZLE) == "sudoku4"
    assert resolve_task("countdown", "86,28,13,31,96") == "cd4" and resolve_task("cd3", "x") == "cd3"
    path = get_task("star-3-5").generate(__import__("random").Random(0), "train")["input"]
    assert resolve_task("path", path) == "star-3-5"
    assert normalise_puzzle("0042\\n2031") == "0042\n2031"
    with pytest.raises(DreamError, match="unknown task 'chess'"):
        resolve_task("chess", "x")


def test_cli_solve_text_json_and_files(sudoku_dirs, tmp_path):
    from dreamlm.cli import app

    res = runner.invoke(app, ["solve", "sudoku", "0042\\n2031\\n4023\\n3214", "-m", str(sudoku_dirs[0]), "--json"])
    assert res.exit_code == 0, res.output
    [sol] = json.loads(res.stdout)
    assert sol["valid"] == (sol["output"] == SOLUTION)
    res = runner.invoke(app, ["solve", "sudoku", PUZZLE, "-m", str(sudoku_dirs[0]), "--show", "--delay", "0"])
    assert res.exit_code == 0 and "masks left" in res.output
    data = tmp_path / "in.jsonl"
    assert runner.invoke(app, ["data", "sudoku4", "--n", "5", "--split", "test", "--out", str(data)]).exit_code == 0
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["solve", "sudoku", "--file", str(data), "--out", str(out), "-m", str(sudoku_dirs[1])])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == {"input", "output", "valid"} for r in rows)
    assert all(r["valid"] == sudoku4_by_the_rules(r["input"], r["output"]) for r in rows)


@pytest.mark.parametrize("args, message", [
    (["solve", "sudoku", "0042\\n2031\\n4023"], "sudoku"),
    (["solve", "sudoku", "1142\\n2031\\n4023\\n3214"], ""),
    (["solve", "countdown", "86,28,13,31,500"], ""),
    (["solve", "chess", "e4"], "unknown task 'chess'"),
    (["solve", "sudoku"], "give one puzzle or --file"),
    (["data", "nope", "--out", "x.jsonl"], "unknown task 'nope'"),
    (["data", "sudoku4", "--split", "ood", "--out", "x.jsonl"], "no ood split"),
])
def test_cli_errors_are_one_line(sudoku_dirs, args, message):
    from dreamlm.cli import app

    if args[0] == "solve" and args[1] == "sudoku" and len(args) > 2:
        args = args + ["-m", str(sudoku_dirs[0])]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0] and "Traceback" not in res.output


def test_default_decoding_is_one_token_per_step_most_confident_first(sudoku_dirs, monkeypatch):
    # Dream's schedule commits two tokens at its last step; the solvers' default decides one slot at a time
    # (threshold 1.0: commit the most confident slot, plus any that are certain), and --steps N is Dream's schedule.
    import dreamlm.solver as solver_module

    seen = []
    real = solver_module.diffusion_generate

    def spy(model, x, **kwargs):
        seen.append(kwargs)
        return real(model, x, **kwargs)

    monkeypatch.setattr(solver_module, "diffusion_generate", spy)
    solver = Solver(sudoku_dirs[0])
    budget = solver.budget(PUZZLE)
    assert budget == 19 < 40 - len(solver.prompt_ids(PUZZLE))  # the grid's 19 characters; EOS and PAD pinned
    history = []
    mask = solver.model.config.mask_token_id

    def hook(step, x, logits):
        if step is not None:  # None: the call before the first step
            history.append(int((x == mask).sum()))
        return x

    solver.solve([PUZZLE], hook=hook)
    assert seen[-1]["threshold"] == 1.0 and seen[-1]["steps"] == budget
    assert history[-1] == 0 and all(a > b for a, b in zip([budget] + history, history))  # >= 1 slot every step
    solver.solve([PUZZLE], steps=5)
    assert "threshold" not in seen[-1] and seen[-1]["steps"] == 5
    # blocks: the default one-step-per-slot is rounded up to a multiple of the blocks (bench speed's blocks rows
    # were refused before: 19 steps over 2 blocks)
    solver.solve([PUZZLE], block_length=10, cache="prefix", threshold=0.99, alg="maskgit_plus")
    assert seen[-1]["steps"] == 20 and seen[-1]["block_length"] == 10


def test_read_shape_picks_the_smallest_covering_shape():
    from dreamlm.solver import read_shape, star_shapes

    shapes = [(2, 5), (2, 11), (3, 7), (4, 6), (5, 5)]
    queries = ((2, 5), (2, 8), (3, 6), (4, 4), (1, 3), (5, 2), (1, 9))
    assert [read_shape(shapes, d, l) for d, l in queries] == [(2, 5), (2, 11), (3, 7), (4, 6), (2, 5), (5, 5),
                                                               (2, 11)]
    assert read_shape(shapes, 5, 6) is None and read_shape(shapes, 6, 2) is None
    assert star_shapes({"task": "star-3-5"}) == [(3, 5)] and star_shapes({"task": "cd3"}) == []
    assert star_shapes({"task": "star-5-5", "star_shapes": [[2, 11], [5, 5]]}) == [(2, 11), (5, 5)]


def test_bundled_solver_dir_falls_back_to_a_wider_or_longer_star(tmp_path, monkeypatch):
    import dreamlm.solver as solver_module

    for name in ("star-2-5-diffusion", "star-5-5-diffusion", "star-3-5-ar", "star-9-4-diffusion"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "star-4-5-diffusion").mkdir()  # no config.json: not a model
    (tmp_path / "star-5-5-diffusion" / "dreamlm_task.json").write_text(  # trained on a mix of shapes
        json.dumps({"task": "star-5-5", "star_shapes": [[2, 11], [3, 7], [5, 5]]}))
    monkeypatch.setattr(solver_module, "bundled_model_dir", lambda name: tmp_path / name)
    pick = solver_module.bundled_solver_dir
    assert pick("star-2-5").name == "star-2-5-diffusion"  # its own model first
    assert pick("star-3-5").name == "star-5-5-diffusion"  # else the smallest wider one of the same length
    assert pick("star-4-5").name == "star-5-5-diffusion"
    assert pick("star-2-5", "ar").name == "star-3-5-ar"
    # Shorter arms: a model with long enough arms, the smallest degree first (the solver stretches the arms).
    assert pick("star-2-4").name == "star-2-5-diffusion"  # degree 2 before length 4
    assert pick("star-6-3").name == "star-9-4-diffusion"
    assert pick("star-5-2").name == "star-5-5-diffusion"
    assert pick("star-3-4").name == "star-5-5-diffusion"
    assert pick("star-1-2", "ar").name == "star-3-5-ar"
    assert pick("star-2-8").name == pick("star-3-6").name == "star-5-5-diffusion"  # its G(2, 11) and G(3, 7)
    assert pick("star-4-4").name == "star-5-5-diffusion"
    for task, kind in (("star-6-5", "diffusion"), ("star-4-6", "diffusion"), ("star-5-5", "ar"), ("sudoku9", "ar"),
                       ("star-10-3", "diffusion"), ("star-2-12", "diffusion")):
        with pytest.raises(DreamError, match=f"no bundled model for {task}"):
            pick(task, kind)
    # A tie on the covering shape goes to the model with fewer arms (the specialist), whatever the names.
    (tmp_path / "star-10-5-diffusion").mkdir()
    (tmp_path / "star-10-5-diffusion" / "config.json").write_text("{}")
    (tmp_path / "star-10-5-diffusion" / "dreamlm_task.json").write_text(
        json.dumps({"task": "star-10-5", "star_shapes": [[3, 7], [5, 5], [10, 5]]}))
    assert pick("star-3-7").name == pick("star-5-3").name == "star-5-5-diffusion"
    assert pick("star-6-5").name == pick("star-10-2").name == "star-10-5-diffusion"
