"""Trainer: exact resume, crash-safe checkpoints, SFT/AR paths, export, config errors, and a 2-process run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.training import state as state_module
from dreamlm.training.config import TrainConfig
from dreamlm.tokenizer import DreamTokenizer
from dreamlm.training.data import ExampleBatches, PackedBlocks, char_tokenizer, read_examples
from dreamlm.training.trainer import Trainer, draw_noise, train

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\nprint(add(1, 2))\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("corpus")
    tokenizer.save_pretrained(root / "tok")
    for i in range(4):
        (root / f"doc{i}.txt").write_text(TEXT * (i + 2) + f"# file {i}\n")
    (root / "valid.txt").write_text(TEXT * 3)
    return root


def pretrain_cfg(corpus: Path, out: Path, *extra: str) -> TrainConfig:
    return TrainConfig.load(None, [
        f"model.tokenizer={corpus / 'tok'}", "model.hidden_size=32", "model.layers=2", "model.heads=2",
        "model.kv_heads=1", "model.context=64",
        "data.train=" + ",".join(str(corpus / f"doc{i}.txt") for i in range(4)), f"data.valid={corpus / 'valid.txt'}",
        "data.seq_len=32", "optim.max_steps=8", "optim.batch_size=4", "optim.warmup_steps=2", "optim.lr=3e-3",
        "run.log_every=1", "run.eval_every=4", "run.save_every=2", "run.progress=false", f"run.out_dir={out}",
        "run.export_dtype=float32", "run.precision=fp32", *extra])


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_is_bit_exact(tmp_path, corpus):
    straight = train(pretrain_cfg(corpus, tmp_path / "a"))
    assert train(pretrain_cfg(corpus, tmp_path / "b", "run.stop_at=5")) is None
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-0000005"
    resumed = train(pretrain_cfg(corpus, tmp_path / "b"), resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000


def test_span_rate_mixes_span_rows_into_the_same_draws(corpus, tokenizer):
    batch = PackedBlocks(sorted(corpus.glob("doc*.txt")), tokenizer, 32, seed=0).next_batch(40)
    plain, spans, half = (draw_noise(batch, 3, 1e-3, 99, rate) for rate in (0.0, 1.0, 0.5))
    assert torch.equal(plain.t, spans.t) and torch.equal(plain.t, half.t)  # t never changes
    kinds = []
    for row in range(40):
        where = spans.masked[row].nonzero(as_tuple=True)[0].tolist()
        assert where == list(range(where[0], where[-1] + 1)) and where[0] >= 1  # one run, never position 0
        same = [torch.equal(half.masked[row], d.masked[row]) for d in (plain, spans)]
        assert any(same)  # each example is either its plain draw or its span draw
        kinds.append(same[1] and not same[0])
    assert 10 < sum(kinds) < 30  # about half are spans


def test_evaluation_ignores_span_rate(tmp_path, corpus):
    values = [Trainer(pretrain_cfg(corpus, tmp_path / f"r{rate}", f"objective.span_rate={rate}")).evaluate()
              for rate in (0.0, 0.5)]
    assert values[0] is not None and values[0] == values[1]  # held-out loss is always Dream's objective


def test_crash_during_save_loses_nothing(tmp_path, corpus, monkeypatch):
    real = state_module.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint dies half-written
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(state_module, "save_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(pretrain_cfg(corpus, tmp_path / "c"))
    root = tmp_path / "c" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert not (root / "step-0000004").exists()
    monkeypatch.setattr(state_module, "save_file", real)
    final = train(pretrain_cfg(corpus, tmp_path / "c"), resume=True)
    reference = train(pretrain_cfg(corpus, tmp_path / "d"))
    a, b = load_file(str(final / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume(tmp_path, corpus):
    train(pretrain_cfg(corpus, tmp_path / "e", "optim.max_steps=2"))
    with pytest.raises(DreamError, match="already holds a run"):
        train(pretrain_cfg(corpus, tmp_path / "e", "optim.max_steps=2"))


def test_export_loads_and_generates(tmp_path, corpus):
    final = train(pretrain_cfg(corpus, tmp_path / "f", "optim.max_steps=3", "run.export_dtype=bfloat16"))
    model = DreamModel.from_pretrained(final)
    assert model.dtype == torch.bfloat16 and model.tokenizer is not None and not model.causal
    x = model.diffusion_generate(torch.tensor([model.tokenizer.encode("def ")]), max_new_tokens=6, steps=6,
                                 alg="entropy")
    assert x.shape == (1, len(model.tokenizer.encode("def ")) + 6)


PUZZLES = [{"input": f"{a}+{b}", "output": str(a + b)} for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def puzzle_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("puzzles") / "add.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PUZZLES))
    return path


def sft_cfg(puzzle_file: Path, out: Path, *extra: str) -> TrainConfig:
    return TrainConfig.load(None, [
        "model.char_alphabet=0123456789+", "model.hidden_size=32", "model.layers=1", "model.heads=2",
        "model.kv_heads=2", "model.context=16", "data.stage=sft", f"data.train={puzzle_file}",
        "data.separator=<|sep|>", "data.seq_len=10", "optim.max_steps=3", "optim.batch_size=8",
        "optim.warmup_steps=0", "run.progress=false", f"run.out_dir={out}", "run.precision=fp32", *extra])


def test_sft_batches_mask_only_the_response(puzzle_file):
    tok = char_tokenizer("0123456789+")
    examples = read_examples(puzzle_file, tok, chat=False, separator="<|sep|>")
    assert tok.decode(examples[23].prompt) == "2+3<|sep|>" and tok.decode(examples[23].response) == "5<|endoftext|>"
    batch = ExampleBatches(examples, 10, tok.pad_token_id, seed=0).next_batch(4)
    for row in range(4):
        p = int((~batch.maskable[row]).sum())
        assert batch.x[row, p - 1] == tok.token_to_id("<|sep|>")  # the prompt ends at the separator
        assert batch.maskable[row, p:].all() and not batch.maskable[row, :p].any()  # response + EOS + pad tail
        n = int(batch.ar_targets[row].sum())
        assert batch.x[row, p + n - 1] == tok.eos_token_id and not batch.ar_targets[row, p + n:].any()
    with pytest.raises(DreamError, match="do not fit seq_len=4"):
        ExampleBatches(examples, 4, tok.pad_token_id)


def test_char_tokenizer_words(tmp_path):
    tok = char_tokenizer("0123456789,|/=", ["10..99", "|"])
    text = "12,45|45,77/12,77=<|sep|>12,45,77"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[:8] == ["12", ",", "45", "|", "45", ",", "77", "/"] and tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("7,123")] == ["7", ",", "12", "3"]  # longest known word first
    plus = char_tokenizer("01", ["+"])
    assert plus.decode(plus.encode("1+0")) == "1+0"  # a one-character word joins the alphabet
    tok.save_pretrained(tmp_path)
    assert DreamTokenizer.from_pretrained(tmp_path).encode(text) == ids  # the split rule survives a round trip
    assert tok.vocab_size == char_tokenizer("0123456789,|/=").vocab_size + 90
    for bad, message in ((["9..3"], "is empty"), ([""], "must not be empty")):
        with pytest.raises(DreamError, match=message):
            char_tokenizer("01", bad)


def test_sft_diffusion_and_ar_runs_export(tmp_path, puzzle_file):
    diff = DreamModel.from_pretrained(train(sft_cfg(puzzle_file, tmp_path / "diff")))
    ar = DreamModel.from_pretrained(train(sft_cfg(puzzle_file, tmp_path / "ar", "objective.kind=ar")))
    assert not diff.causal and ar.causal
    assert diff.tokenizer.decode(diff.tokenizer.encode("12+3")) == "12+3"


def test_init_from_grows_the_rotary_window_only_to_model_context(tmp_path, puzzle_file):
    first = train(sft_cfg(puzzle_file, tmp_path / "short", "model.context=10"))
    assert DreamModel.from_pretrained(first).config.max_position_embeddings == 10
    longer = ("data.seq_len=14", f"model.init_from={first}", "optim.max_steps=1")
    with pytest.raises(DreamError, match="seq_len=14 exceeds the model's 10 positions"):
        train(sft_cfg(puzzle_file, tmp_path / "no", *longer, "model.context=12"))
    grown = DreamModel.from_pretrained(train(sft_cfg(puzzle_file, tmp_path / "grown", *longer, "model.context=16")))
    assert grown.config.max_position_embeddings == 16
    same = DreamModel.from_pretrained(train(sft_cfg(puzzle_file, tmp_path / "same", f"model.init_from={first}",
                                                    "optim.max_steps=1", "model.context=64")))
    assert same.config.max_position_embeddings == 10  # the data fits: the window is left as it was


def test_init_from_grows_the_vocabulary_keeping_trained_rows(tmp_path):
    from dreamlm.tasks import write_dataset

    train_file = write_dataset("star-2-3", 32, 0, "train", tmp_path / "train.jsonl")
    base = ["model.char_alphabet=0123456789,|/=>", "model.hidden_size=32", "model.layers=1", "model.heads=2",
            "model.kv_heads=2", "model.context=24", "data.stage=sft", "data.task=star-2-3", "data.view=edges",
            f"data.train={train_file}", "data.separator=<|sep|>", "data.seq_len=24", "optim.max_steps=2",
            "optim.batch_size=8", "run.progress=false", "run.export_dtype=float32", "model.compose_words=true"]
    small = train(TrainConfig.load(None, [*base, "model.char_words=10..14,10..14>10..14",
                                          f"run.out_dir={tmp_path / 's'}"]))
    old = DreamModel.from_pretrained(small)
    grown = {}
    for compose in ("true", "false"):
        cfg = TrainConfig.load(None, [*base, "model.char_words=10..16,10..16>10..16", f"model.init_from={small}",
                                      f"model.compose_words={compose}", "optim.max_steps=1", "optim.lr=1e-9",
                                      f"run.out_dir={tmp_path / compose}"])
        grown[compose] = DreamModel.from_pretrained(train(cfg))
    new_tok = grown["true"].tokenizer
    assert new_tok.vocab_size == old.tokenizer.vocab_size + 2 + (7 * 6 - 5 * 4)  # 2 names and 22 edges more
    for word in ("12>14", "10", ">", "<|mask|>"):  # shared tokens keep their rows (ids moved) ...
        i, j = new_tok.token_to_id(word), old.tokenizer.token_to_id(word)
        for attr in ("model.embed_tokens.weight", "lm_head.weight"):
            a, b = grown["false"].get_parameter(attr)[i], old.get_parameter(attr)[j]
            assert torch.allclose(a, b, atol=1e-4), (word, attr)
    new_edge = new_tok.token_to_id("15>16")  # ... new compound words are composed only when asked
    assert not torch.allclose(grown["true"].model.embed_tokens.weight[new_edge],
                              grown["false"].model.embed_tokens.weight[new_edge])
    assert torch.allclose(grown["true"].model.embed_tokens.weight[new_tok.token_to_id("12>14")],
                          grown["false"].model.embed_tokens.weight[new_tok.token_to_id("12>14")], atol=1e-4)


def test_tie_embeddings_shares_one_matrix(tmp_path, puzzle_file):
    model = DreamModel.from_pretrained(train(sft_cfg(puzzle_file, tmp_path / "tied", "model.tie_embeddings=true")))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = DreamModel.from_pretrained(train(sft_cfg(puzzle_file, tmp_path / "untied")))
    assert untied.num_parameters() - model.num_parameters() == model.lm_head.weight.numel()


def test_packed_blocks_resume_and_shard(corpus, tokenizer):
    files = [corpus / f"doc{i}.txt" for i in range(4)]
    whole = PackedBlocks(files, tokenizer, 16, seed=3).next_batch(6).x
    r0 = PackedBlocks(files, tokenizer, 16, seed=3, rank=0, world=2).next_batch(3).x
    r1 = PackedBlocks(files, tokenizer, 16, seed=3, rank=1, world=2).next_batch(3).x
    assert torch.equal(whole[0::2], r0) and torch.equal(whole[1::2], r1)
    src = PackedBlocks(files, tokenizer, 16, seed=3)
    src.next_batch(4)
    again = PackedBlocks(files, tokenizer, 16, seed=3)
    again.load_state_dict(src.state_dict())
    assert torch.equal(src.next_batch(2).x, again.next_batch(2).x)


@pytest.mark.parametrize("overrides, message", [
    (["model.nope=1"], "unknown key 'model.nope'"),
    (["optim.lr=abc"], "bad value 'abc' for optim.lr"),
    (["objective.kind=gan"], "objective.kind must be"),
    (["optim.max_steps=0"], "optim.max_steps must be"),
    (["run.export_dtype=int8"], "run.export_dtype"),
    (["objective.span_rate=1.5"], r"objective.span_rate must be in \[0, 1\]"),
    (["objective.span_rate=0.5", "objective.kind=ar"], "objective.span_rate is for diffusion training"),
])
def test_config_errors(overrides, message):
    with pytest.raises(DreamError, match=message):
        TrainConfig.load(None, ["data.train=x.txt", *overrides])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden_size = 'big'\n")
    with pytest.raises(DreamError, match="bad value 'big' for model.hidden_size"):
        TrainConfig.load(bad)
    bad.write_text("[wat]\n")
    with pytest.raises(DreamError, match=r"unknown section \[wat\]"):
        TrainConfig.load(bad)
    bad.write_text("not toml = = 1")
    with pytest.raises(DreamError, match="not valid TOML"):
        TrainConfig.load(bad)


def test_two_processes_agree_with_one(tmp_path, corpus):
    common = ["optim.max_steps=4", "run.rank_summaries=true", "run.save_every=4", "run.eval_every=100"]
    single = train(pretrain_cfg(corpus, tmp_path / "one", "optim.batch_size=4", *common))
    cfg = pretrain_cfg(corpus, tmp_path / "two", "optim.batch_size=2", *common)
    toml = tmp_path / "two.toml"
    toml.write_text(_to_toml(cfg.to_dict()))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dreamlm.cli", "train", str(toml)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "two" / f"rank_summary-{r}.json").read_text()) for r in (0, 1))
    assert r0["losses"] == r1["losses"] and r0["checksum"] == r1["checksum"]  # the ranks agree
    one = json.loads((tmp_path / "one" / "rank_summary-0.json").read_text())
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-4)
    a = load_file(str(single / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_rank_with_nothing_masked_does_not_hang(tmp_path, corpus):
    # rank 1 draws no masked token in any micro-batch; before, it skipped forward/backward and the run hung in FSDP
    cfg = pretrain_cfg(corpus, tmp_path / "clean", "optim.batch_size=2", "optim.max_steps=2", "run.save_every=2",
                       "run.eval_every=2")
    toml = tmp_path / "clean.toml"
    toml.write_text(_to_toml(cfg.to_dict()))
    script = Path(__file__).parent / "scripts" / "train_clean_rank.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(toml)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "clean" / "final" / "model.safetensors").exists()
    logged = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]


def _to_toml(d: dict) -> str:
    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_recipes_are_valid_configs():
    root = Path(__file__).resolve().parents[1] / "recipes"
    # recipes/rl holds RL recipes (RLConfig, with [rollout] and [grpo]); tests/test_rl.py loads those
    recipes = sorted(r for r in root.rglob("*.toml") if r.parent.name != "rl")
    assert len(recipes) > 10
    for recipe in recipes:
        cfg = TrainConfig.load(recipe)
        cfg.validate()
        assert cfg.data.train and cfg.optim.max_steps >= 1
    # Every planning diffusion recipe has an AR twin: same model, data, steps and batch; only the objective (and
    # its own learning rate) differ. A recipe that starts from earlier stages (model.init_from) lists their
    # commands (`--max-steps N --out-dir DIR`, the last one its init), and all stages together take as many steps
    # as all of its twin's.
    def total_steps(recipe: Path, cfg: dict) -> int:
        init_from = cfg["model"].pop("init_from")
        stages = re.findall(r"--max-steps (\d+) --out-dir (\S+)", recipe.read_text())
        if not init_from:
            return cfg["optim"]["max_steps"]
        assert stages and init_from == stages[-1][1] + "/final", recipe.name  # it says how its init was made
        return cfg["optim"]["max_steps"] + sum(int(steps) for steps, _ in stages)

    pairs = 0
    for diff in sorted((root / "planning").glob("*-diffusion.toml")):
        twin = diff.with_name(diff.name.replace("diffusion", "ar"))
        d, a = TrainConfig.load(diff).to_dict(), TrainConfig.load(twin).to_dict()
        assert d["objective"]["kind"] == "diffusion" and a["objective"]["kind"] == "ar"
        assert total_steps(diff, d) == total_steps(twin, a), diff.name
        assert d["model"] == a["model"] and d["data"] == a["data"], diff.name
        for key in ("batch_size", "grad_accum"):
            assert d["optim"][key] == a["optim"][key], (diff.name, key)
        pairs += 1
    assert pairs >= 6


def test_cli_train_tokenizer_and_train(tmp_path, corpus):
    from typer.testing import CliRunner

    from dreamlm.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train-tokenizer", str(tmp_path / "tok"), "--data", str(corpus / "doc*.txt"),
                              "--vocab-size", "300"])
    assert res.exit_code == 0, res.output
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""[model]\ntokenizer = "{tmp_path / 'tok'}"\nhidden_size = 32\nlayers = 1\nheads = 2\n
kv_heads = 2\ncontext = 32\n[data]\ntrain = ["{corpus}/doc*.txt"]\nseq_len = 16\n[optim]\nmax_steps = 2\n
batch_size = 2\nwarmup_steps = 0\n[run]\nprogress = false\n""")
    res = runner.invoke(app, ["train", str(cfg), "--out-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    gen = runner.invoke(app, ["generate", "def ", "-m", str(tmp_path / "run" / "final"), "--max-new-tokens", "4"])
    assert gen.exit_code == 0, gen.output
    bad = runner.invoke(app, ["train", str(cfg), "--set", "optim.lr=-1", "--out-dir", str(tmp_path / "run2")])
    assert bad.exit_code == 2 and "optim.lr must be > 0" in bad.stderr


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_star_edges_view_training_logs_solve_accuracy(tmp_path, kind):
    # A planning run in the star graphs' "edges" view: pairs are mapped through the view, val_acc is the share of
    # held-out puzzles solved (by the rules), and the exported model solves them the same way from its directory.
    from dreamlm.solver import Solver
    from dreamlm.tasks import write_dataset

    train_file = write_dataset("star-2-3", 64, 0, "train", tmp_path / "train.jsonl")
    short_file = write_dataset("star-2-2", 16, 0, "train", tmp_path / "short.jsonl")
    valid_file = write_dataset("star-2-3", 16, 1, "test", tmp_path / "test.jsonl")
    cfg = TrainConfig.load(None, [
        "model.char_alphabet=0123456789,|/=>", "model.char_words=10..14,10..14>10..14", "model.hidden_size=32",
        "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.context=24", "data.stage=sft",
        "data.task=star-2-3", "data.view=edges", f"data.train={train_file},{short_file}", f"data.valid={valid_file}",
        "data.separator=<|sep|>", "data.seq_len=24", "optim.max_steps=4", "optim.batch_size=8", "run.eval_every=2",
        "run.eval_solve=16", "run.progress=false", "run.export_dtype=float32", f"run.out_dir={tmp_path / 'run'}",
        f"objective.kind={kind}"])
    final = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accs = [r["val_acc"] for r in records if "val_acc" in r]
    assert [r["step"] for r in records if "val_acc" in r] == [2, 4] and all(0 <= a <= 1 for a in accs)
    meta = json.loads((final / "dreamlm_task.json").read_text())
    assert meta["view"] == "edges" and meta["task"] == "star-2-3"
    assert meta["star_shapes"] == [[2, 2], [2, 3]]  # the shapes of its training graphs
    solver = Solver(final)
    puzzles = [json.loads(line)["input"] for line in valid_file.read_text().splitlines()]
    solutions = solver.solve(puzzles)
    assert sum(s.valid for s in solutions) / len(puzzles) == accs[-1]
    edges_part = solver.tok.decode(solver.prompt_ids(puzzles[0]), skip_special_tokens=True).split("/")[0]
    assert ">" in edges_part and len(solver.prompt_ids(puzzles[0])) == 4 + 3 + 5 + 1  # one token per edge


def test_eval_solve_needs_a_task(tmp_path, puzzle_file):
    with pytest.raises(DreamError, match="eval_solve needs data.task"):
        sft_cfg(puzzle_file, tmp_path, "run.eval_solve=4").validate()
    with pytest.raises(DreamError, match="has no view 'nope'"):
        train(sft_cfg(puzzle_file, tmp_path / "v", "data.task=star-2-5", "data.view=nope"))


def test_compose_words_builds_edge_rows_from_their_parts():
    from dreamlm.training.trainer import build_model, build_tokenizer

    def model_for(*extra: str) -> tuple[DreamModel, DreamTokenizer]:
        cfg = TrainConfig.load(None, ["model.char_alphabet=0123456789,|>", "model.char_words=10..13,10..13>10..13",
                                      "model.hidden_size=32", "model.layers=1", "model.heads=2", "model.kv_heads=2",
                                      "model.context=16", "data.train=x.jsonl", "data.seq_len=16", *extra])
        tok = build_tokenizer(cfg)
        return build_model(cfg, tok), tok

    model, tok = model_for("model.compose_words=true")
    plain, _ = model_for()
    emb, base = model.model.embed_tokens.weight, plain.model.embed_tokens.weight

    def row(table: torch.Tensor, word: str) -> torch.Tensor:
        return table[tok.token_to_id(word)]

    # Every edge into 12 shares one direction: the difference of two edges depends only on their other ends.
    assert torch.allclose(row(emb, "10>12") - row(emb, "11>12"), row(emb, "10>13") - row(emb, "11>13"), atol=1e-6)
    assert torch.allclose(row(emb, "12>10") - row(emb, "12>11"), row(emb, "13>10") - row(emb, "13>11"), atol=1e-6)
    assert not torch.allclose(row(emb, "10>12"), row(emb, "12>10"), atol=1e-3)  # orientation kept
    assert not torch.allclose(row(base, "10>12") - row(base, "11>12"), row(base, "10>13") - row(base, "11>13"),
                              atol=1e-3)  # the plain init has no such structure
    # Only the compound words change; names, characters and specials keep the plain init; the scale stays.
    for word in ("10", ">", ",", "<|mask|>"):
        assert torch.equal(row(emb, word), row(base, word))
    edges = torch.stack([row(emb, f"{a}>{b}") for a in range(10, 14) for b in range(10, 14) if a != b])
    assert 0.5 < edges.std().item() / base.std().item() < 2.0
    again, _ = model_for("model.compose_words=true")
    assert torch.equal(again.model.embed_tokens.weight, emb)  # seeded


def test_compose_words_needs_compound_words():
    from dreamlm.training.trainer import build_model, build_tokenizer

    cfg = TrainConfig.load(None, ["model.char_alphabet=0123456789,|>", "model.char_words=10..13>10..13",
                                  "model.compose_words=true", "model.hidden_size=32", "model.layers=1",
                                  "model.heads=2", "model.kv_heads=2", "model.context=16", "data.train=x.jsonl",
                                  "data.seq_len=16"])
    with pytest.raises(DreamError, match="compose_words: no char_words token is made of other tokens"):
        build_model(cfg, build_tokenizer(cfg))  # the names 10..13 are not tokens, so no edge can be composed


def test_a_nan_loss_stops_the_run_without_exporting(tmp_path, corpus, monkeypatch):
    from dreamlm.training import trainer as trainer_module

    real = trainer_module.Trainer.train_step

    def diverging(self):
        metrics = real(self)
        if self.step == 3:
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(trainer_module.Trainer, "train_step", diverging)
    with pytest.raises(DreamError, match="the loss is nan at step 3: training diverged"):
        train(pretrain_cfg(corpus, tmp_path / "n"))
    assert not (tmp_path / "n" / "final").exists()
    assert (tmp_path / "n" / "checkpoints" / "latest").read_text().strip() == "step-0000002"


def test_resume_with_another_model_shape_is_one_clear_error(tmp_path, corpus):
    assert train(pretrain_cfg(corpus, tmp_path / "s", "run.stop_at=2")) is None
    with pytest.raises(DreamError, match="does not fit this config's model") as info:
        train(pretrain_cfg(corpus, tmp_path / "s", "model.hidden_size=48"), resume=True)
    assert "\n" not in str(info.value)


def test_sft_mix_fills_a_share_of_every_batch_and_resumes_exactly(tmp_path, corpus, tokenizer):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i} {i}"}) + "\n" for i in range(5)))
    cfg = pretrain_cfg(corpus, tmp_path / "mix", f"data.sft_mix={chat}", "data.sft_share=0.25")
    trainer = Trainer(cfg)
    batch = trainer.train_source.next_batch(4)
    assert batch.x.shape == (4, 32)
    # three packed rows (everything but position 0 maskable) and one SFT row: prompt clean, response + padding not
    assert bool(batch.maskable[:3, 1:].all())
    row = batch.maskable[3]
    prompt_len = len(tokenizer.encode(f"say {0}"))
    assert not bool(row[:prompt_len].any()) and bool(row[prompt_len:].all())
    assert int(batch.index[3]) >= 10 ** 12  # its noise seeds never coincide with a packed row's
    straight = train(pretrain_cfg(corpus, tmp_path / "a", f"data.sft_mix={chat}"))
    assert train(pretrain_cfg(corpus, tmp_path / "b", f"data.sft_mix={chat}", "run.stop_at=5")) is None
    train(pretrain_cfg(corpus, tmp_path / "b", f"data.sft_mix={chat}"), resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and straight is not None
    with pytest.raises(DreamError, match="sft_share"):
        pretrain_cfg(corpus, tmp_path / "c", f"data.sft_mix={chat}", "data.sft_share=1")
