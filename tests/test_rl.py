"""`dreamlm rl`: rewards (built-ins, sandboxing, bad rewards), the GRPO loop on tiny random planning models
(diffusion and AR), exact resume, the CLI's bad-input lines."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamlm.cli import app
from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.rl import (Completion, RewardError, RLConfig, builtin_reward, code_tests, partial_credit, rollouts,
                        score, train)
from dreamlm.rl.loop import GRPOTrainer
from dreamlm.solver import Solver, write_task_file
from dreamlm.tasks import get_task, make_examples, stargraph
from dreamlm.training.data import char_tokenizer

TASK = "star-2-3"
SEQ_LEN = 40


def planning_model(path: Path, causal: bool = False) -> Path:
    """A random 1-layer star-graph G(2, 3) planning model (character tokenizer, task file)."""
    tok = char_tokenizer("0123456789,|/=")
    config = DreamConfig(vocab_size=((tok.vocab_size + 7) // 8) * 8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=SEQ_LEN, max_window_layers=1, mask_token_id=tok.mask_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, causal=causal, initializer_range=0.3)
    DreamModel(config).init_weights(0).save_pretrained(path, tokenizer=tok)
    write_task_file(path, TASK, SEQ_LEN, "<|sep|>", "test fixture")
    return path


@pytest.fixture(scope="module")
def diffusion_dir(tmp_path_factory) -> Path:
    return planning_model(tmp_path_factory.mktemp("rl") / "star-diffusion")


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory) -> Path:
    return planning_model(tmp_path_factory.mktemp("rl") / "star-ar", causal=True)


def varied(completion: Completion, example) -> float:
    """A reward that differs within groups of a random model's completions (so every step updates)."""
    return float(len(set(completion.ids)) % 3) + 0.25 * (completion.text[:1] == example["input"][:1])


def config(model_dir: Path, out: Path, *extra: str) -> RLConfig:
    return RLConfig.load(None, [f"model.init_from={model_dir}", f"data.task={TASK}", f"run.out_dir={out}",
                                "rollout.group_size=4", "rollout.prompts=2", "optim.max_steps=4", "optim.lr=1e-3",
                                "run.eval_solve=4", "run.eval_every=2", "run.save_every=1", "run.progress=false",
                                "run.precision=fp32", "grpo.beta=0.1", *extra])


# ---- rewards -------------------------------------------------------------------------------------------------
def test_task_rewards_and_partial_credit():
    example = make_examples("star-3-5", 1, 5, "test")[0]
    reward, partial = builtin_reward("task", "star-3-5"), builtin_reward("task-partial", "star-3-5")
    assert reward(Completion(example["output"]), example) == 1.0
    assert partial(Completion(example["output"]), example) == 1.0
    path = example["output"].split(",")
    wrong_leaf = ",".join(path[:-1] + ["999"])
    assert reward(Completion(wrong_leaf), example) == 0.0
    assert partial(Completion(wrong_leaf), example) == pytest.approx(0.9 * 4 / 5)
    assert partial(Completion("not a path"), example) == 0.0
    sudoku = make_examples("sudoku4", 1, 0, "test")[0]
    assert partial_credit("sudoku4", sudoku["input"], sudoku["output"]) == pytest.approx(0.9)
    assert partial_credit("sudoku4", sudoku["input"], "1111\n2222\n3333\n4444") == 0.0  # givens not kept
    assert partial_credit("cd3", "1,2,3,6", "1+2=3,3+3=6x") == 0.0
    assert partial_credit("cd3", "1,2,3,6", "1+2=4,3*3=9") == 0.1
    assert builtin_reward("exact-match")(Completion(" 12,3 "), {"output": "12,3"}) == 1.0
    with pytest.raises(DreamError, match="unknown reward"):
        builtin_reward("accuracy", TASK)


def test_bad_rewards_raise_one_line_errors():
    example = {"input": "1,2|2,3/1,3="}

    def boom(c, e):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"reward 'boom' raised KeyError: 'answer'") as info:
        score(boom, Completion("x"), example)
    assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match="returned nan"):
        score(lambda c, e: float("nan"), Completion("x"), example, "nan-reward")
    with pytest.raises(RewardError, match="returned str"):
        score(lambda c, e: "1", Completion("x"), example, "text-reward")
    with pytest.raises(RewardError, match="returned NoneType"):
        score(lambda c, e: None, Completion("x"), example, "none-reward")
    assert score(lambda c, e: True, Completion("x"), example) == 1.0
    assert score(lambda c, e: 3, Completion("x"), example) == 3.0


def test_code_reward_runs_in_the_sandbox(tmp_path):
    reward = code_tests(timeout=2.0)
    example = {"prefix": "def add(a, b):\n", "tests": "assert add(2, 3) == 5"}
    assert reward(Completion("    return a + b"), example) == 1.0
    assert reward(Completion("    return a - b"), example) == 0.0
    target = tmp_path / "escaped.txt"
    escape = f"    open({str(target)!r}, 'w').write('x')\n    return a + b"
    assert reward(Completion(escape), example) == 0.0 and not target.exists()
    network = "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return a + b"
    assert reward(Completion(network), example) == 0.0
    start = time.perf_counter()
    assert reward(Completion("    while True:\n        pass"), example) == 0.0
    assert time.perf_counter() - start < 10


# ---- rollouts and the loop -----------------------------------------------------------------------------------
def test_rollouts_use_the_solver_layout(diffusion_dir):
    solver = Solver(diffusion_dir)
    examples = make_examples(TASK, 3, 0, "train")
    batch = rollouts(solver, examples, 4, 1.0, "entropy", torch.Generator().manual_seed(0))
    assert batch.x.shape == (12, SEQ_LEN) and len(batch.completions) == 12
    answer = solver.answer_tokens(examples[0]["input"])
    for r in range(12):
        length = int(batch.prompt[r].sum())
        assert batch.x[r, :length].tolist() == solver.prompt_ids(examples[r // 4]["input"])
        # the answer's slots are generated; EOS after them and the PAD tail are pinned, not scored
        assert batch.generated[r].nonzero().flatten().tolist() == list(range(length, length + answer))
        assert int(batch.x[r, length + answer]) == solver.model.config.eos_token_id
    again = rollouts(solver, examples, 4, 1.0, "entropy", torch.Generator().manual_seed(0))
    assert torch.equal(batch.x, again.x)
    assert len({c.ids for c in batch.completions[:4]}) > 1  # a group's completions differ at temperature 1


@pytest.mark.parametrize("estimator", ["one_step", "coupled", "elbo"])
def test_grpo_changes_the_diffusion_policy_and_exports(diffusion_dir, tmp_path, estimator):
    cfg = config(diffusion_dir, tmp_path / "run", f"grpo.estimator={estimator}", "optim.max_steps=2")
    path = train(cfg, reward=varied)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in lines if "reward" in h]
    assert [h["step"] for h in steps] == [1, 2] and all(h["kl"] >= 0 for h in steps)
    assert [h["step"] for h in lines if "val_acc" in h] == [0, 2]
    assert steps[1]["kl"] > 0  # the policy moved away from the reference after the first step's updates
    before = load_file(str(diffusion_dir / "model.safetensors"))
    after = load_file(str(path / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((path / "dreamlm_task.json").read_text())
    assert meta["task"] == TASK and meta["rl_base"] == diffusion_dir.name and meta["rl_estimator"] == estimator
    assert (tmp_path / "run" / "rl.png").is_file()
    Solver(path).solve([e["input"] for e in make_examples(TASK, 2, 1, "test")])  # a working planning model


def test_ar_twin_uses_exact_logprobs(ar_dir, tmp_path):
    cfg = config(ar_dir, tmp_path / "run", "grpo.estimator=coupled", "optim.max_steps=2")
    trainer = GRPOTrainer(cfg, reward=varied)
    assert trainer.estimator.value == "exact"
    path = trainer.fit()
    assert json.loads((path / "dreamlm_task.json").read_text())["rl_estimator"] == "exact"
    assert Solver(path).kind == "ar"


def test_resume_is_bit_exact(diffusion_dir, tmp_path):
    straight = train(config(diffusion_dir, tmp_path / "a", "grpo.inner_steps=2"), reward=varied)
    assert train(config(diffusion_dir, tmp_path / "b", "grpo.inner_steps=2", "run.stop_at=2"), reward=varied) is None
    resumed = train(config(diffusion_dir, tmp_path / "b", "grpo.inner_steps=2"), resume=True, reward=varied)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rewards(run):
        return [(h["step"], h["reward"], h["kl"]) for h in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                                                .read_text().splitlines()) if "reward" in h]

    assert rewards("a") == rewards("b")


def test_bad_reward_stops_with_a_checkpoint(diffusion_dir, tmp_path):
    calls = {"n": 0}

    def flaky(completion, example):
        calls["n"] += 1
        return float("nan") if calls["n"] > 8 else varied(completion, example)  # step 2 (8 completions a step)

    with pytest.raises(RewardError, match=r"returned nan .*stopped at step 1, checkpoint saved") as info:
        train(config(diffusion_dir, tmp_path / "run"), reward=flaky)
    assert "\n" not in str(info.value)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    path = train(config(diffusion_dir, tmp_path / "run"), resume=True, reward=varied)  # fixed: it continues
    assert path is not None and path.is_dir()


def test_refill_keeps_only_informative_groups(diffusion_dir, tmp_path):
    def half(completion, example):  # every completion of half the puzzles gets the same reward: no signal
        return 1.0 if sum(map(ord, example["input"])) % 2 else varied(completion, example)

    cfg = config(diffusion_dir, tmp_path / "run", "rollout.refill=6", "rollout.prompts=3", "optim.max_steps=2")
    trainer = GRPOTrainer(cfg, reward=half)
    first = trainer.examples(0)
    rng = random.Random("dreamlm-rl/0/0")  # round 0 draws as before refills existed (old runs resume the same)
    assert first == [get_task(TASK).generate(rng, "train") for _ in range(3)]
    assert trainer.examples(0, 1) != first and trainer.examples(0, 1) == trainer.examples(0, 1)
    batch, rewards = trainer._rollouts(first, torch.Generator().manual_seed(0))
    kept, kept_rewards, rounds, tokens = trainer._refill(batch, rewards, torch.Generator().manual_seed(1))
    groups = kept_rewards.view(-1, 4)
    assert 1 <= groups.shape[0] <= 3 and (groups.max(1).values > groups.min(1).values).all()
    assert kept.x.shape[0] == len(kept.completions) == groups.numel() and 0 <= rounds <= 6
    assert tokens >= batch.tokens and (rounds == 0) == (tokens == batch.tokens)
    # every kept row's reward is its own completion's (rows and rewards stay together)
    examples = first + [e for k in range(1, rounds + 1) for e in trainer.examples(0, k)]
    by_input = {e["input"]: e for e in examples}
    for r, completion in enumerate(kept.completions):
        prompt = trainer.solver.decode(kept.x[r][kept.prompt[r]].tolist())
        example = next(e for text, e in by_input.items() if text in prompt or prompt in text)
        assert float(kept_rewards[r]) == half(completion, example)
    path = train(cfg, reward=half)
    steps = [h for h in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "reward" in h]
    assert all("refills" in h and 0 <= h["kept_groups"] <= 3 for h in steps) and path.is_dir()
    with pytest.raises(DreamError, match="rollout.refill draws fresh train-split puzzles"):
        GRPOTrainer(config(diffusion_dir, tmp_path / "files", "rollout.refill=1", f"data.train=[\"{tmp_path}\"]"))
    with pytest.raises(DreamError, match="rollout.refill must be in 0..64"):
        config(diffusion_dir, tmp_path, "rollout.refill=65")


# ---- config and CLI ------------------------------------------------------------------------------------------
def test_recipe_errors_name_the_key(diffusion_dir, tmp_path):
    with pytest.raises(DreamError, match="rl recipe: rollout.group_size must be >= 2"):
        config(diffusion_dir, tmp_path, "rollout.group_size=1")
    with pytest.raises(DreamError, match="rl recipe: unknown key 'grpo.kl'"):
        config(diffusion_dir, tmp_path, "grpo.kl=0.1")
    with pytest.raises(DreamError, match="unknown estimator"):
        config(diffusion_dir, tmp_path, "grpo.estimator=d2")
    recipe = tmp_path / "r.toml"
    recipe.write_text("[objective]\nkind = 'ar'\n")
    with pytest.raises(DreamError, match=r"\[objective\] does not apply"):
        RLConfig.load(recipe)
    for recipe in sorted(Path(__file__).parent.parent.glob("recipes/rl/*.toml")):
        RLConfig.load(recipe)  # the shipped recipes parse


def test_cli_bad_input_is_one_line(diffusion_dir, tmp_path):
    runner = CliRunner()
    cases = [["rl", str(tmp_path / "missing.toml")],
             ["rl", str(Path(__file__).parent.parent / "recipes/rl/star-10-5-diffusion.toml"), "--set",
              "grpo.beta=-1"],
             ["rl", str(Path(__file__).parent.parent / "recipes/rl/star-10-5-diffusion.toml"), "--set",
              f"run.out_dir={tmp_path / 'none'}", "--resume"]]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
        assert result.output.startswith("error:")


def test_partial_credit_uses_the_unique_path():
    rng = random.Random(3)
    puzzle = stargraph.generate(rng, 3, 4)
    assert get_task("star-3-4").validate(puzzle.input, puzzle.output)
    assert partial_credit("star-3-4", puzzle.input, ",".join(map(str, puzzle.path[:2]))) == pytest.approx(0.9 * 2 / 4)


def test_bench_planning_rl_columns(diffusion_dir, tmp_path):
    from dreamlm.bench import planning_table, rl_models, rl_table

    with pytest.raises(DreamError, match="not a model made by `dreamlm rl`"):
        rl_models([diffusion_dir])
    scores = {"accuracy": 0.5, "forward_passes": 5.0, "ms_per_solution": 1.0, "n": 2}
    report = {"results": {"star-10-5": {"test": {"diffusion": scores, "ar": scores,
                                                 "diffusion_rl": {**scores, "accuracy": 0.75}},
                                        "steps_curve": []}},
              "star_grid": {"star-8-5": {"models": {"diffusion": "a", "ar": "b"}, "diffusion": scores, "ar": scores,
                                         "ar_rl": {**scores, "accuracy": 0.125}}},
              "rl_models": {"star-10-5-diffusion": "x"}}
    table = rl_table(report)
    assert "| star-10-5 test | 50.0 % | 75.0 % | 50.0 % | – |" in table
    assert "| G(8, 5) | 50.0 % | – | 50.0 % | 12.5 % |" in table
    assert table in planning_table(report)
