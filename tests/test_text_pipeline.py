"""The text-model pipeline (recipes/text): FIM blocks, the Qwen2 export that `dreamlm convert` reads, the recipes
run end to end in miniature, `dreamlm bench infill`, and the bundled stdlib-code model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.infill_bench import (Case, body_lines, diffusion_fill, edit_similarity, line_cases, paired_difference,
                                  span_cases)
from dreamlm.model import DreamModel
from dreamlm.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, DreamTokenizer
from dreamlm.training.config import TrainConfig
from dreamlm.training.data import PackedBlocks, char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "dreamlm" / "assets" / "stdlib-code"
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\nprint(add(1, 2))\n")
runner = CliRunner()


@pytest.fixture(scope="module")
def fim_tokenizer():
    from dreamlm.tiny import CORPUS
    from dreamlm.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 20, fim=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fim")
    for i in range(3):
        (root / f"doc{i}.txt").write_text(TEXT * (i + 3) + f"# file {i}\n")
    return root


def sentinels(tok: DreamTokenizer) -> tuple[int, int, int]:
    ids = tuple(tok.token_to_id(s) for s in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    assert None not in ids
    return ids  # type: ignore[return-value]


def test_fim_blocks_rearrange_the_plain_block(corpus, fim_tokenizer):
    tokenizer = fim_tokenizer
    files = sorted(corpus.glob("doc*.txt"))
    plain = PackedBlocks(files, tokenizer, 32, seed=3).next_batch(12).x.tolist()
    fim = PackedBlocks(files, tokenizer, 32, seed=3, fim_rate=1.0).next_batch(12).x.tolist()
    pre, suf, mid = sentinels(tokenizer)
    for p, f in zip(plain, fim):
        assert len(f) == 32 and f[0] == pre and f.count(suf) == 1 and f.count(mid) == 1
        s, m = f.index(suf), f.index(mid)
        assert s < m
        prefix, suffix, middle = f[1:s], f[s + 1:m], f[m + 1:]
        assert prefix + middle + suffix == p[:29]  # the block's first seq_len - 3 tokens, cut at two points
    none = PackedBlocks(files, tokenizer, 32, seed=3, fim_rate=0.0).next_batch(12).x.tolist()
    assert none == plain


def test_fim_rate_mixes_blocks_deterministically_and_resumes(corpus, fim_tokenizer):
    tokenizer = fim_tokenizer
    files = sorted(corpus.glob("doc*.txt"))
    pre = sentinels(tokenizer)[0]
    a = PackedBlocks(files, tokenizer, 32, seed=1, fim_rate=0.5)
    first = a.next_batch(40).x
    share = float((first[:, 0] == pre).float().mean())
    assert 0.25 < share < 0.75  # about half
    state = a.state_dict()
    after = a.next_batch(8).x
    b = PackedBlocks(files, tokenizer, 32, seed=1, fim_rate=0.5)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(8).x, after)
    again = PackedBlocks(files, tokenizer, 32, seed=1, fim_rate=0.5).next_batch(40).x
    assert torch.equal(first, again)


def test_fim_needs_the_sentinels(corpus, tokenizer):
    for plain in (char_tokenizer("abc"), tokenizer):  # tokenizers trained without --fim have no sentinels
        with pytest.raises(DreamError, match="fim_prefix"):
            PackedBlocks(sorted(corpus.glob("doc*.txt")), plain, 32, fim_rate=0.5)


def test_fim_tokenizer_keeps_qwen2s_order_with_the_mask_last(fim_tokenizer, tokenizer):
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, "<|mask|>"]
    ids = [fim_tokenizer.token_to_id(n) for n in names]
    assert ids == list(range(ids[0], ids[0] + 7)) and fim_tokenizer.mask_token_id == ids[-1]
    assert tokenizer.token_to_id(FIM_PREFIX) is None  # without fim=True the layout is unchanged


@pytest.mark.parametrize("overrides, message", [
    (["data.fim_rate=0.5", "objective.kind=diffusion"], "data.fim_rate is for AR pretraining"),
    (["data.fim_rate=1.5", "objective.kind=ar"], "data.fim_rate must be in [0, 1]"),
    (["run.export_format=qwen2"], "run.export_format 'qwen2' is for AR runs"),
    (["run.export_format=hf", "objective.kind=ar"], "run.export_format must be 'dream' or 'qwen2'"),
])
def test_pipeline_config_errors(overrides, message):
    with pytest.raises(DreamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig.load(None, ["data.train=x.txt", *overrides])


def miniature(recipe: str, tmp: Path, corpus: Path, *extra: str) -> list[str]:
    """A recipe of recipes/text shrunk for a test: tiny model, 2 steps, tmp paths."""
    cfg = TrainConfig.load(ROOT / "recipes" / "text" / recipe)
    sets = [f"run.out_dir={tmp / recipe.removesuffix('.toml')}", "optim.max_steps=2", "optim.batch_size=2",
            "optim.warmup_steps=1", "data.seq_len=48", "model.context=64", "run.eval_every=1", "run.eval_batches=1",
            f"data.train={corpus}/doc*.txt", f"data.valid={corpus}/doc0.txt"]
    if not cfg.model.init_from:
        sets += [f"model.tokenizer={tmp / 'tok'}", "model.hidden_size=32", "model.layers=1", "model.heads=2",
                 "model.kv_heads=2"]
    return ["train", str(ROOT / "recipes" / "text" / recipe), *[a for s in sets + list(extra) for a in ("--set", s)]]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, corpus):
    """recipes/text/pipeline.sh in miniature: tokenizer, AR stage, convert, and every model of the comparison."""
    tmp = tmp_path_factory.mktemp("pipeline")
    res = runner.invoke(app, ["train-tokenizer", str(tmp / "tok"), "--data", f"{corpus}/doc*.txt",
                              "--vocab-size", "300"])
    assert res.exit_code == 0, res.output
    stage = tmp / "ar-stage" / "final"
    dream = tmp / "ar-stage-dream"
    steps = [miniature("ar-stage.toml", tmp, corpus),
             ["convert", str(stage), str(dream)],
             miniature("ar2diff.toml", tmp, corpus, f"model.init_from={dream}"),
             miniature("ar-full.toml", tmp, corpus, f"model.init_from={stage}"),
             miniature("ar-fim.toml", tmp, corpus, f"model.init_from={stage}"),
             miniature("diff-scratch.toml", tmp, corpus)]
    for args in steps:
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    return tmp


def test_the_ar_stage_is_a_plain_qwen2_checkpoint(pipeline):
    config = json.loads((pipeline / "ar-stage" / "final" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "causal" not in config and "mask_token_id" not in config
    ours = DreamModel.from_pretrained(pipeline / "ar-stage" / "final", dtype=torch.float32)
    assert ours.causal  # a Qwen2 checkpoint is read as the AR model it is
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(pipeline / "ar-stage" / "final"),
                                                       torch_dtype=torch.float32).eval()
    x = torch.tensor([ours.tokenizer.encode("def add(a, b):\n    return")])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4)


def test_convert_makes_the_ar_stage_a_diffusion_model(pipeline):
    stage = DreamModel.from_pretrained(pipeline / "ar-stage" / "final", dtype=torch.float32)
    dream = DreamModel.from_pretrained(pipeline / "ar-stage-dream", dtype=torch.float32)
    assert not dream.causal and dream.config.model_type == "Dream"
    assert dream.config.mask_token_id == stage.tokenizer.token_to_id("<|mask|>")
    assert torch.equal(dream.lm_head.weight, stage.lm_head.weight)  # same weights, only the attention changes
    for name in ("ar2diff", "diff-scratch"):
        assert not DreamModel.from_pretrained(pipeline / name / "final").causal
    for name in ("ar-full", "ar-fim"):
        assert json.loads((pipeline / name / "final" / "config.json").read_text())["model_type"] == "qwen2"


def test_edit_similarity_values():
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("same", "same") == 1.0


def test_body_lines_are_one_line_statements_in_functions():
    source = ('"""Module."""\nX = 1\n\n\ndef f(a):\n    """Doc."""\n    total = a + 1\n    # a comment here\n'
              '    call(a,\n         b)\n    if a:\n        return total * 2\n    return None\n')
    assert body_lines(source) == [7, 12, 13]  # not the docstring, comment, the two-line call, `if a:`, top level


def test_line_and_span_cases_are_consistent(tokenizer):
    lines, nexts, _ = line_cases(tokenizer, 6)
    for case, nxt in zip(lines, nexts):
        text = tokenizer.decode(case.middle)
        assert text.startswith(" ") and text.endswith("\n") and not text[1:].startswith(" ")
        assert tokenizer.encode(tokenizer.decode(case.prefix + case.middle + case.suffix)) == \
            case.prefix + case.middle + case.suffix  # the canvas is what the model saw in training
        assert nxt.task == "next" and nxt.suffix == [] and (nxt.prefix, nxt.middle) == (case.prefix, case.middle)
    assert len({c.where for c in lines}) == 6
    spans = span_cases(tokenizer, 4, 5)
    assert all(len(c.middle) == 4 and len(c.prefix) == 128 and len(c.suffix) == 64 for c in spans)


def test_diffusion_fill_writes_exactly_the_masks(tiny_dir):
    model = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = model.tokenizer
    case = Case("line", tok.encode("def add(a, b):\n   "), tok.encode(" return a + b\n"), tok.encode("x = 1"), "t")
    for length in (1, 5, 9):
        got = diffusion_fill(model, tok, case, length)
        assert len(got) == length and model.config.mask_token_id not in got


def test_bench_infill_compares_the_pipeline_models(pipeline, tmp_path):
    models = [("diffusion", "ar2diff"), ("diffusion", "diff-scratch"), ("ar", "ar-full"), ("ar-fim", "ar-fim")]
    args = ["bench", "infill", "--n", "3", "--spans", "4", "--blocks", "1", "--mc-num", "2", "--out", str(tmp_path)]
    for kind, name in models:
        args += ["-m", f"{kind}={pipeline / name / 'final'}"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "infill.json").read_text())
    assert report["tasks"] == ["line", "span-4", "next"]
    assert list(report["results"]) == ["diffusion: ar2diff", "diffusion: diff-scratch", "ar: ar-full",
                                       "ar-fim: ar-fim"]
    for row in report["results"].values():
        assert all(0 <= r["exact_match"] <= 1 and 0 <= r["edit_similarity"] <= 1 and r["n"] == 3
                   for r in row["tasks"].values())
        assert row["heldout"]["bits_per_token"] > 0
    assert "line, +4 masks" in report["results"]["diffusion: ar2diff"]["tasks"]
    assert "line, +4 masks" not in report["results"]["ar: ar-full"]["tasks"]
    assert (tmp_path / "infill.png").stat().st_size > 1000 and "| ar-fim: ar-fim |" in res.output
    # every diffusion model against every AR model, case by case, from the per-case scores
    pairs = [(p["diffusion"], p["baseline"]) for p in report["paired"]]
    assert pairs == [("diffusion: ar2diff", "ar: ar-full"), ("diffusion: ar2diff", "ar-fim: ar-fim"),
                     ("diffusion: diff-scratch", "ar: ar-full"), ("diffusion: diff-scratch", "ar-fim: ar-fim")]
    d, b = report["results"]["diffusion: ar2diff"]["tasks"]["line"], report["results"]["ar: ar-full"]["tasks"]["line"]
    assert len(d["per_case"]) == 3
    assert report["paired"][0]["tasks"]["line"]["mean"] == pytest.approx(d["edit_similarity"] - b["edit_similarity"],
                                                                         abs=1e-3)
    assert "Diffusion minus AR" in res.output and report["settings"]["decoding"].startswith(
        "diffusion: one token per step, entropy order")


def test_paired_difference_is_the_mean_with_a_bootstrap_interval():
    same = paired_difference([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    shifted = paired_difference([0.3, 0.7, 1.0, 0.2], [0.2, 0.6, 0.9, 0.1])  # every case +0.1: no spread
    assert shifted["mean"] == pytest.approx(0.1) and shifted["low"] == pytest.approx(0.1)
    assert shifted["high"] == pytest.approx(0.1)
    a = [i / 50 for i in range(50)]
    b = [0.5] * 50
    mixed = paired_difference(a, b)
    assert mixed["low"] < mixed["mean"] < mixed["high"] and mixed["mean"] == pytest.approx(0.49 - 0.5)
    assert mixed["low"] > -0.2 and mixed["high"] < 0.2  # sd 0.29 over 50 cases: about +-0.08
    assert paired_difference(a, b) == mixed  # seeded
    with pytest.raises(DreamError, match="same, non-empty list of cases"):
        paired_difference([0.1, 0.2], [0.1])


def test_bench_infill_decodes_in_the_order_asked(pipeline, tmp_path):
    res = runner.invoke(app, ["bench", "infill", "--n", "2", "--spans", "4", "--blocks", "1", "--mc-num", "1",
                              "--alg", "maskgit_plus", "--seed", "3", "-m",
                              f"diffusion={pipeline / 'ar2diff' / 'final'}", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "infill.json").read_text())
    assert report["settings"]["seed"] == 3 and "maskgit_plus order" in report["settings"]["decoding"]
    assert report["paired"] == []  # no AR model to compare with


@pytest.mark.parametrize("args, message", [
    (["-m", "diffusion"], "--model takes KIND=PATH"),
    (["-m", "gpt=x"], "unknown model kind 'gpt'"),
    (["-m", "diffusion=/no/such/dir"], "does not exist"),
    (["--spans", "4,x"], "--spans must be comma-separated integers"),
    (["--spans", "0"], "every span length must be in 1..64"),
    (["--n", "0"], "--n must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--alg", "bogus"], "unknown alg 'bogus'"),
])
def test_bench_infill_bad_input_is_one_line(args, message, tmp_path):
    res = runner.invoke(app, ["bench", "infill", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output


def test_bench_infill_refuses_a_model_of_the_wrong_kind(pipeline, tmp_path):
    res = runner.invoke(app, ["bench", "infill", "-m", f"diffusion={pipeline / 'ar-full' / 'final'}",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a causal (AR) model, not diffusion" in res.stderr


def test_the_bundled_stdlib_code_model_is_the_default_and_infills():
    from dreamlm.cli import default_model_dir

    assert default_model_dir() == BUNDLED
    model = DreamModel.from_pretrained(BUNDLED, dtype=torch.float32)
    assert not model.causal and model.config.mask_token_id == model.tokenizer.token_to_id("<|mask|>")
    assert sum(p.numel() for p in model.parameters()) < 15_000_000  # bf16 on disk: under 30 MB
    template = "def read_lines(path):\n    with open(path) as f:\n        return <|mask:6|>\n"
    res = runner.invoke(app, ["infill", template, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["text"].startswith("def read_lines(path):\n    with open(path) as f:\n        return ")
    assert "<|mask|>" not in out["text"] and len(out["fills"]) == 1
    gen = runner.invoke(app, ["generate", "import os\n", "--max-new-tokens", "16"])
    assert gen.exit_code == 0 and gen.stdout.strip() and "<|mask|>" not in gen.stdout  # the continuation


def test_the_eval_code_infill_lines_come_from_held_out_modules():
    from dreamlm.eval.data import INFILL_MODULES, code_infill_set

    rows = code_infill_set(4, DreamTokenizer.from_pretrained(BUNDLED))
    assert {r["module"] for r in rows} <= set(INFILL_MODULES)
    shipped = [json.loads(line) for line in
               (ROOT / "src/dreamlm/eval/tasks/data/code_infill.jsonl").read_text().splitlines()]
    assert {r["module"] for r in shipped} <= set(INFILL_MODULES) and len(shipped) == 60


def test_function_body_cases_score_by_their_unit_tests(tokenizer):
    from dreamlm.chatset import FUNCTIONS
    from dreamlm.infill_bench import body_cases, length_table, score_bodies

    cases = body_cases(tokenizer)
    assert len(cases) == len(FUNCTIONS) and all(case.middle and case.suffix for case, _ in cases)
    right = score_bodies(tokenizer, cases, lambda case: case.middle)  # the reference bodies pass their tests
    assert right["pass_rate"] == 1.0 and right["edit_similarity"] == 1.0
    wrong = score_bodies(tokenizer, cases, lambda case: tokenizer.encode("\n    return None"))
    assert wrong["pass_rate"] == 0.0 and 0 < wrong["edit_similarity"] < 1
    row = {"modes": {"oracle": {"exact_match": 0.25, "edit_similarity": 0.5}, "auto": {"refused": "no states"}},
           "bodies": {"oracle": right, "auto": {"refused": "no states"}}}
    table = length_table({"settings": {"modes": ["oracle", "auto"]}, "results": {"m": row}})
    assert "| m | lines: exact / edit sim. | 25.0 % / 0.500 | refused (no length states) |" in table
    assert "| m | bodies: tests passed / edit sim. | 100.0 % / 1.000 | refused (no length states) |" in table


def test_bench_infill_lengths_with_an_ar_baseline_told_no_length(pipeline, tmp_path):
    from dreamlm.infill_bench import ar_fill_free, body_cases

    diffusion, ar = pipeline / "ar2diff" / "final", pipeline / "ar-full" / "final"
    args = ["bench", "infill", "--lengths", "oracle,2x", "--n", "2", "--context", "128", "--out", str(tmp_path),
            "-m", f"diffusion={diffusion}", "-m", f"ar={ar}"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "infill-lengths.json").read_text())
    row, base = report["results"]["diffusion: ar2diff"], report["results"]["ar: ar-full"]
    assert set(row["bodies"]) == {"oracle", "2x"} and all(0 <= r["pass_rate"] <= 1 for r in row["bodies"].values())
    assert base["kind"] == "ar" and base["free"]["lines"]["n"] == 2 and 1 <= base["free"]["bodies"]["n"] <= 24
    assert "| ar: ar-full | lines: exact / edit sim. | — | — |" in res.output
    assert "AR, prefix only (no length)" in (tmp_path / "infill-lengths.md").read_text()
    # the baseline stops where the gap ends: a line after its newline, a body before column 0
    model = DreamModel.from_pretrained(ar, dtype=torch.float32)
    tok = model.tokenizer
    line = Case("line", tok.encode("def f(x):\n   "), tok.encode(" return x\n"), tok.encode("y = 1\n"), "t")
    text = tok.decode(ar_fill_free(model, tok, line, 40))
    assert "\n" not in text[:-1]
    for case, _ in body_cases(tok)[:3]:
        body = tok.decode(ar_fill_free(model, tok, case, 40))
        assert all(not part or part[0].isspace() for part in body.split("\n"))
    refused = runner.invoke(app, ["bench", "infill", "--lengths", "oracle", "--out", str(tmp_path),
                                  "-m", f"ar-fim={pipeline / 'ar-fim' / 'final'}"])
    assert refused.exit_code == 2 and "not ar-fim" in refused.output
