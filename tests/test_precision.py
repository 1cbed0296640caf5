"""Inference precision: what `--dtype auto` picks and says, the sampler's fp32 arithmetic under a bf16 model, bf16
logits within the error bf16's rounding allows, and the bundled solvers solving the same puzzles in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import dreamlm.precision as precision_module
from dreamlm.cli import app
from dreamlm.model import DreamModel
from dreamlm.precision import inference_precision
from dreamlm.sampling import diffusion_generate
from dreamlm.sampling import generate as generate_module
from dreamlm.solver import Solver, bundled_model_dir

runner = CliRunner()
NO_BF16 = "precision: fp32 (auto: this CPU has no native bf16 (no AVX512-BF16 or AMX))"
AVX512_BF16 = "precision: bf16 (auto: this CPU multiplies bf16 natively (avx512_bf16))"


@pytest.fixture()
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_features", lambda: [])


@pytest.fixture()
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_features", lambda: ["avx512_bf16"])


# ---- the choice ---------------------------------------------------------------------------------------------------
def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_without_bf16):
    for name in ("auto", None):
        chosen = inference_precision(name, "cpu")
        assert chosen.dtype == torch.float32 and chosen.describe() == NO_BF16


def test_auto_is_bf16_on_a_cpu_with_avx512_bf16(cpu_with_bf16):
    chosen = inference_precision("auto", "cpu")
    assert chosen.dtype == torch.bfloat16 and chosen.describe() == AVX512_BF16


def test_an_explicit_dtype_wins_over_the_hardware(cpu_with_bf16):
    assert inference_precision("float32", "cpu").describe() == "precision: fp32 (asked for)"
    assert inference_precision("bfloat16", "cpu").dtype == torch.bfloat16


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture()
def loaded_dtypes(monkeypatch) -> list:
    """The dtype of every model the CLI loads."""
    seen = []
    real = DreamModel.from_pretrained.__func__

    def spy(cls, path, dtype=None, device=None, causal=None):
        model = real(cls, path, dtype=dtype, device=device, causal=causal)
        seen.append(model.dtype)
        return model

    monkeypatch.setattr(DreamModel, "from_pretrained", classmethod(spy))
    return seen


@pytest.mark.parametrize("hardware, line, dtype", [("cpu_without_bf16", NO_BF16, torch.float32),
                                                   ("cpu_with_bf16", AVX512_BF16, torch.bfloat16)])
def test_generate_defaults_to_auto_and_says_so_on_stderr(request, tiny_dir, loaded_dtypes, hardware, line, dtype):
    request.getfixturevalue(hardware)
    res = runner.invoke(app, ["generate", "hi", "-m", str(tiny_dir), "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert stderr_lines(res) == [line]
    assert json.loads(res.stdout)["steps"] == 4  # stdout stays one JSON object
    assert loaded_dtypes == [dtype]


def test_fp32_is_one_flag_away(cpu_with_bf16, tiny_dir, loaded_dtypes):
    res = runner.invoke(app, ["infill", "x = <|mask:2|>", "-m", str(tiny_dir), "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    assert stderr_lines(res) == ["precision: fp32 (asked for)"] and loaded_dtypes == [torch.float32]


def test_solve_runs_the_solver_in_the_chosen_precision(cpu_with_bf16, loaded_dtypes):
    res = runner.invoke(app, ["solve", "sudoku", "0403\\n3042\\n0234\\n4001", "--json"])
    assert res.exit_code == 0, res.output
    assert stderr_lines(res) == [AVX512_BF16] and loaded_dtypes == [torch.bfloat16]
    [answer] = json.loads(res.stdout)
    assert answer["valid"]


def test_a_refused_input_still_gets_one_error_line(cpu_with_bf16, tiny_dir):
    # the precision line comes only once the input is accepted: a refused prompt gets the error alone
    res = runner.invoke(app, ["generate", "<|foo|>", "-m", str(tiny_dir)])
    assert res.exit_code == 2 and stderr_lines(res) == ["error: unknown special token <|foo|> in the prompt"]
    res = runner.invoke(app, ["generate", "hi", "-m", str(tiny_dir), "--dtype", "int8"])
    assert res.exit_code == 2
    assert stderr_lines(res) == ["error: unknown dtype 'int8'; choose auto, float32, bfloat16 or float16"]


# ---- the sampler computes in fp32 ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_model(tiny_dir) -> DreamModel:
    return DreamModel.from_pretrained(tiny_dir, dtype=torch.bfloat16)


@pytest.mark.parametrize("settings", [dict(alg="entropy", temperature=0.7, top_p=0.9, alg_temp=0.5),
                                      dict(alg="topk_margin", top_k=5), dict(alg="origin", temperature=1.0),
                                      dict(alg="maskgit_plus", threshold=0.5, block_length=4, cache="dual")])
def test_a_bf16_model_is_sampled_in_fp32(bf16_model, monkeypatch, settings):
    seen = []
    real_sample, real_commit = generate_module.sample_tokens, generate_module._commit_top

    def sample_spy(logits, *args, **kwargs):
        confidence, x0 = real_sample(logits, *args, **kwargs)
        seen.append(("logits", logits.dtype))
        seen.append(("confidence", confidence.dtype))
        return confidence, x0

    def commit_spy(x, mask_index, rows, cols, confidence, *args):
        seen.append(("committed confidence", confidence.dtype))
        return real_commit(x, mask_index, rows, cols, confidence, *args)

    monkeypatch.setattr(generate_module, "sample_tokens", sample_spy)
    monkeypatch.setattr(generate_module, "_commit_top", commit_spy)
    out = diffusion_generate(bf16_model, torch.tensor([[5, 17, 33]]), max_new_tokens=8, steps=8, seed=0, **settings)
    assert not bool((out == bf16_model.config.mask_token_id).any())
    assert seen and {dtype for _, dtype in seen} == {torch.float32}


def test_a_logits_hook_sees_fp32_logits_of_a_bf16_model(bf16_model):
    dtypes = []

    def hook(step, x, logits):
        dtypes.append(logits.dtype)
        return logits

    diffusion_generate(bf16_model, torch.tensor([[5, 17, 33]]), max_new_tokens=4, steps=4,
                       generation_logits_hook_func=hook)
    assert dtypes == [torch.float32] * 4


def test_ar_decoding_of_a_bf16_model_upcasts_once(bf16_model, monkeypatch):
    from dreamlm.sampling import autoregressive

    seen = []
    real = autoregressive.sampler_logits

    def spy(logits):
        out = real(logits)
        seen.append((logits.dtype, out.dtype))
        return out

    monkeypatch.setattr(autoregressive, "sampler_logits", spy)
    bf16_model.causal = True
    try:
        autoregressive.ar_generate(bf16_model, torch.tensor([[5, 17]]), 3, temperature=0.8, stop_at_eos=False,
                                   generator=torch.Generator().manual_seed(0))
    finally:
        bf16_model.causal = False
    assert seen == [(torch.bfloat16, torch.float32)] * 3


def test_the_parity_fixtures_stay_fp32(tiny_model, long_model):
    # tests/reference.py's exactness tests (test_sampling, test_fast, test_step_machine) compare token for token
    # against a literal transcription of Dream's sampler; they must keep running the fp32 models
    assert tiny_model.dtype == torch.float32 and long_model.dtype == torch.float32


# ---- bf16 closeness ---------------------------------------------------------------------------------------------
def bf16_roundings(layers: int) -> int:
    """How many bf16 roundings the longest path from the input ids to a logit goes through, at most.

    Per decoder layer, attention branch: the normed input (1), the q/k/v weight (1) and output (1), RoPE's two
    products and sum (3), the attention output (1), o_proj's weight (1) and output (1), the residual sum (1): 10.
    MLP branch: the normed input (1), gate's weight (1) and output (1), SiLU (1), the gated product (1), down's
    weight (1) and output (1), the residual sum (1): 8. Outside the layers: the embedding row (1), the final norm
    (1), the head's weight (1) and output (1): 4. (Matmul accumulation is fp32 inside the kernels, RMSNorm computes
    in fp32: each contributes its one output rounding, counted above.)"""
    return 4 + 18 * layers


def test_bf16_logits_are_within_bf16_rounding_of_fp32(tiny_dir):
    # bf16 keeps 8 significant bits: each rounding has relative error at most u = 2^-8. To first order, relative
    # errors along a path add up, so with k roundings on the longest path the logits of a position differ from
    # fp32's by at most k * u in relative (Euclidean) norm, the network's conditioning taken as 1 (every branch
    # starts from an RMS-normalised input). The bound follows from the model's structure, not from a measurement.
    fp32 = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32)
    bf16 = DreamModel.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, fp32.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, rounded = fp32(ids), bf16(ids).float()
    tolerance = bf16_roundings(fp32.config.num_hidden_layers) * 2.0 ** -8
    relative = (rounded - exact).norm(dim=-1) / exact.norm(dim=-1)  # (B, L)
    assert float(relative.max()) <= tolerance, (float(relative.max()), tolerance)
    assert float(relative.max()) > 0  # really computed in bf16


# ---- the bundled solvers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sudoku4-diffusion", "star-3-5-diffusion", "star-5-5-diffusion"])
def test_bundled_solvers_solve_the_same_held_out_puzzles_in_bf16(name):
    from dreamlm.bench import TEST_SEED
    from dreamlm.tasks import make_examples

    path = bundled_model_dir(name)
    if not (path / "config.json").is_file():
        pytest.skip(f"{name} is not bundled")
    task = json.loads((path / "dreamlm_task.json").read_text())["task"]
    puzzles = [e["input"] for e in make_examples(task, 12, TEST_SEED, "test")]
    fp32 = Solver(path).solve(puzzles)
    bf16 = Solver(path, dtype=torch.bfloat16).solve(puzzles)
    assert [s.valid for s in bf16] == [s.valid for s in fp32]
    assert sum(s.valid for s in fp32) >= 3  # a sample the model can mostly solve
