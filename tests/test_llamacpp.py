"""llama.cpp reads dreamlm's GGUF exports as it reads Dream-v0: one non-causal forward gives dreamlm's logits (f32
within 1e-4), q8_0 and llama.cpp's own Q4_K_M stay close, and a whole generation driven by llama.cpp's logits gives
dreamlm's tokens. Needs llama-cpp-python (the `[llamacpp]` extra, which builds llama.cpp from source); skipped
without it. Models are tiny and random, plus the bundled sudoku solver."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

llama_cpp = pytest.importorskip("llama_cpp", exc_type=ImportError, reason="llama-cpp-python is not installed (pip install "
                                "'dreamlm[llamacpp]'; it builds llama.cpp from source, minutes on 2 cores)")

import gguf  # noqa: E402
from dreamlm.cli import app  # noqa: E402
from dreamlm.errors import DreamError  # noqa: E402
from dreamlm.formats.gguf import gguf_to_dream  # noqa: E402
from dreamlm.formats.gguf_export import export_gguf, export_model  # noqa: E402
from dreamlm.formats.llamacpp import (LlamaCppDream, check_interop, llamacpp_generate,  # noqa: E402
                                      llamacpp_logits)
from dreamlm.model import DreamModel  # noqa: E402
from dreamlm.sampling import diffusion_generate  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """llama.cpp (whose contexts take torch's thread count) and torch on one thread: on a busy 2-core machine a
    second spinning thread stalls every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> DreamModel:
    return DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def canvas_of(model: DreamModel, prompt: int = 6, masks: int = 10) -> torch.Tensor:
    """The prompt (random ids below the mask id), masks, and one committed token among them."""
    ids = torch.randint(0, model.config.mask_token_id, (1, prompt + masks), generator=torch.Generator().manual_seed(1))
    ids[0, prompt:] = model.config.mask_token_id
    ids[0, prompt + 3] = 5  # a committed token among the masks
    return ids


def test_f32_logits_equal_dreamlms(tiny, tmp_path):
    path = export_gguf(tiny, tiny.tokenizer, tmp_path / "m.gguf", type="f32")
    x = canvas_of(tiny)
    with LlamaCppDream(path, x.shape[1]) as llm:
        assert llm.mask_token_id == tiny.config.mask_token_id and llm.n_vocab == tiny.config.vocab_size
        theirs = torch.from_numpy(llm.forward(x[0].tolist()))
        shifted = llamacpp_logits(llm, x)
    with torch.no_grad():
        ours = tiny(x)[0]
    assert (theirs - ours).abs().max() < 1e-4
    assert torch.equal(shifted[0, 1:], theirs[:-1]) and torch.equal(shifted[0, 0], theirs[0])  # Dream's shift


def test_attention_is_bidirectional(tiny, tmp_path):
    """A token late in the canvas changes the outputs before it (a causal graph would leave them alone)."""
    path = export_gguf(tiny, tiny.tokenizer, tmp_path / "m.gguf", type="f32")
    x = canvas_of(tiny)
    y = x.clone()
    y[0, -1] = 7
    with LlamaCppDream(path, x.shape[1]) as llm:
        a, b = llm.forward(x[0].tolist()), llm.forward(y[0].tolist())
    assert abs(a[0] - b[0]).max() > 1e-4


def test_llama_shaped_model_with_zero_biases_and_tied_head(tiny, tmp_path):
    cfg = dataclasses.replace(tiny.config, attention_bias=False, tie_word_embeddings=True)
    model = DreamModel(cfg).init_weights(3).eval()
    path = export_gguf(model, tiny.tokenizer, tmp_path / "llama.gguf", type="f32")
    x = canvas_of(model)
    with LlamaCppDream(path, x.shape[1]) as llm:
        theirs = torch.from_numpy(llm.forward(x[0].tolist()))
    with torch.no_grad():
        assert (theirs - model(x)[0]).abs().max() < 1e-4


def test_generation_driven_by_llama_cpp_gives_dreamlms_tokens(tiny, tmp_path):
    path = export_gguf(tiny, tiny.tokenizer, tmp_path / "m.gguf", type="f32")
    prompt = canvas_of(tiny)[:, :6]
    with LlamaCppDream(path, 6 + 12) as llm:
        for alg, extra in (("entropy", {}), ("maskgit_plus", {"threshold": 0.3, "block_length": 4})):
            ours = diffusion_generate(tiny, prompt, max_new_tokens=12, steps=12, alg=alg, seed=0, **extra)
            theirs, passes = llamacpp_generate(llm, tiny, prompt, 12, steps=12, alg=alg, **extra)
            assert torch.equal(ours, theirs), alg
            assert 1 <= passes <= 12
        with pytest.raises(DreamError, match="keeps no key/value memory"):
            llamacpp_generate(llm, tiny, prompt, 12, steps=12, cache="dual", block_length=4)
        with pytest.raises(DreamError, match="does not fit"):
            llm.forward([1] * 19)


def test_q8_0_and_q4_k_stay_close(tiny, tiny_dir, tmp_path):
    x = canvas_of(tiny)
    with torch.no_grad():
        ours = tiny(x)[0].double().log_softmax(-1)
    kl = {}
    for kind in ("q8_0", "q4_k"):
        path = export_model(tiny_dir, tmp_path / f"m-{kind}.gguf", type=kind)
        with LlamaCppDream(path, x.shape[1]) as llm:
            theirs = torch.from_numpy(llm.forward(x[0].tolist())).double().log_softmax(-1)
        kl[kind] = float((ours.exp() * (ours - theirs)).sum(-1).max())
    assert 0 < kl["q8_0"] < kl["q4_k"] < 0.05
    reader = gguf.GGUFReader(tmp_path / "m-q4_k.gguf")
    assert reader.fields["general.file_type"].contents() == 15  # llama.cpp's MOSTLY_Q4_K_M
    kinds = {t.tensor_type.name for t in reader.tensors}
    # hidden 64 is no multiple of the k-quants' 256: llama.cpp falls back to Q5_0 (Q8_0 for Q6_K) by itself
    assert "F32" in kinds and kinds & {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert not (tmp_path / "m-q4_k.gguf.f32.tmp").exists()
    # and our importer reads llama.cpp's quantized file back (the gguf library dequantizes what it cannot write)
    back = DreamModel.from_pretrained(gguf_to_dream(tmp_path / "m-q4_k.gguf", tmp_path / "back", dtype="float32"))
    with torch.no_grad():
        again = back(x)[0].double().log_softmax(-1)
    assert float((ours.exp() * (ours - again)).sum(-1).max()) < 0.05


def test_bundled_solver_check(tmp_path):
    report = check_interop("sudoku4-diffusion", types=("f32", "q8_0"), workdir=tmp_path)
    f32, q8 = report.logits
    assert f32.max_abs_diff < 1e-4 and f32.argmax_agreement == 1.0
    assert q8.argmax_agreement >= 0.99 and q8.kl_mean < 1e-2
    assert all(g.tokens_agree for g in report.generation if g.type == "f32")
    assert report.generation[0].new_tokens == f32.canvas - report.prompt_tokens


def test_export_check_prints_the_tables(tmp_path):
    result = runner.invoke(app, ["export", "sudoku4-diffusion", str(tmp_path / "s.gguf"), "--type", "f32", "--check"])
    assert result.exit_code == 0, result.output
    assert "| sudoku4-diffusion | f32 |" in result.output and "tokens agree" in result.output


def test_bench_peer_writes_its_report(tmp_path, monkeypatch):
    import dreamlm.llamacpp_bench as bench

    monkeypatch.setattr(bench, "ROUND_SECONDS", 0.0)  # one timed round
    out = tmp_path / "results"
    result = runner.invoke(app, ["bench", "speed", "--peer", "llamacpp", "--peer-model", "sudoku4-diffusion",
                                 "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "llamacpp.json").read_text())
    modes = [r["mode"] for r in report["speed"][0]["rows"]]
    assert modes[0] == "dreamlm float32, vanilla" and "llama.cpp f32, vanilla" in modes
    assert "llama.cpp q8_0, vanilla" in modes
    assert all(r["tokens_per_second"] > 0 for r in report["speed"][0]["rows"])
    assert (out / "llamacpp.md").is_file() and (out / "llamacpp.png").is_file()
