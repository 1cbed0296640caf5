"""GGUF import: tiny Llama / Qwen2 GGUFs written here (Q8_0, Q4_1, F32 as the shipped SmolLM2 file) convert into
Dream directories whose weights are the dequantized ones in HF's layout, whose causal logits and tokenizer ids equal
transformers' own reading of the same file, and which carry the mask token as `dreamlm convert` adds it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gguf
from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.formats.gguf import gguf_model, gguf_to_dream, permute_rotary, unpermute_rotary
from dreamlm.model import DreamModel
from tiny_gguf import SPECIALS, TEXTS, gguf_name, write_tiny_gguf

runner = CliRunner()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    """(TinyGGUF, its float32 Dream conversion loaded causal) for each architecture."""
    folder = tmp_path_factory.mktemp(f"gguf-{request.param}")
    made = write_tiny_gguf(folder / f"tiny-{request.param}.gguf", request.param)
    out = gguf_to_dream(made.path, folder / "dream", dtype="float32")
    return made, DreamModel.from_pretrained(out, causal=True)


def test_rotary_permutation_round_trip():
    w = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)  # 8 heads of dim 16
    p = permute_rotary(w, 8)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_rotary(p, 8), w)
    # llama.cpp's layout interleaves the halves: its row 1 of head 0 is HF's row D/2 = 8
    assert torch.equal(p[1], w[8]) and torch.equal(p[2], w[1]) and torch.equal(p[16 + 1], w[16 + 8])


def test_weights_are_the_dequantized_tensors_in_hf_layout(tiny):
    made, model = tiny
    reader = gguf.GGUFReader(made.path)
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert kinds == {"Q8_0", "Q4_1", "F32"}  # the quant types of the shipped SmolLM2 file
    ours = dict(model.named_parameters())
    cfg = model.config
    for t in reader.tensors:
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        want = want.reshape(tuple(int(d) for d in reversed(t.shape)))
        hf_name = next(n for n in made.hf.state_dict() if gguf_name(n) == t.name)
        if made.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            want = unpermute_rotary(want, cfg.num_attention_heads if "attn_q" in t.name else cfg.num_key_value_heads)
        got = ours[hf_name].detach()
        if hf_name == "model.embed_tokens.weight" or (hf_name == "lm_head.weight" and not cfg.tie_word_embeddings):
            got = got[:-1]  # the appended mask row
        assert torch.equal(got, want), t.name
        # and in HF's layout: the source weight, up to the 4-bit quantization step (a misplaced row is ~0.1 off)
        assert (got - made.hf.state_dict()[hf_name]).abs().max() < 0.01, t.name


def test_causal_logits_equal_transformers_reading_the_same_gguf(tiny):
    made, model = tiny
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    ref = transformers.AutoModelForCausalLM.from_pretrained(made.path.parent, gguf_file=made.path.name,
                                                            dtype=torch.float32).eval()
    ids = torch.tensor([model.tokenizer.encode(TEXTS[0] + TEXTS[2])])
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape[-1] == theirs.shape[-1] + 1  # the mask token's row
    torch.testing.assert_close(ours[..., :-1], theirs, rtol=0, atol=1e-5)


def test_tokenizer_ids_equal_transformers_and_round_trip(tiny):
    made, model = tiny
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(made.path.parent, gguf_file=made.path.name)
    tok = model.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Reverse 'abc' in Python."}])
    assert chat == "<|im_start|>user\nReverse 'abc' in Python.<|im_end|>\n<|im_start|>assistant\n"
    for text in TEXTS + [chat]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>") == [2] and tok.eos_token_id == 2 and tok.bos_token_id == 1
    if made.arch == "llama":  # smollm: every digit alone
        assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_mask_token_added_as_convert_adds_it(tiny):
    made, model = tiny
    n = len(made.tokens)
    cfg = model.config
    assert model.tokenizer.token_to_id("<|mask|>") == n == cfg.mask_token_id and cfg.vocab_size == n + 1
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    embed = model.model.embed_tokens.weight
    torch.testing.assert_close(embed[n], embed[:n].mean(0))
    assert cfg.tie_word_embeddings == (made.arch == "llama")
    assert cfg.model_type == "Dream" and cfg.attention_bias == (made.arch == "qwen2")
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    special = {v["content"] for v in json.loads((made.path.parent / "dream" / "tokenizer_config.json")
                                                .read_text())["added_tokens_decoder"].values()}
    assert special == set(SPECIALS) | {"<|mask|>"}


def test_bf16_default_and_bidirectional(tiny, tmp_path):
    made, model = tiny
    out = gguf_to_dream(made.path, tmp_path / "bf16")
    bf16 = DreamModel.from_pretrained(out)
    assert bf16.dtype == torch.bfloat16 and not bf16.causal and not bf16.config.causal
    assert torch.equal(bf16.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))


def test_refusals(tmp_path):
    made = write_tiny_gguf(tmp_path / "odd.gguf", "llama", pre="tekken")
    with pytest.raises(DreamError, match="pre-tokenizer 'tekken' is not supported .*known: gpt-2, qwen2, smollm"):
        gguf_model(made.path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(DreamError, match="is not a readable GGUF file"):
        gguf_model(tmp_path / "junk.gguf")
    with pytest.raises(DreamError, match="does not exist"):
        gguf_model(tmp_path / "missing.gguf")


def test_convert_cli_takes_a_gguf(tmp_path):
    made = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    res = runner.invoke(app, ["convert", str(made.path), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "mask token id 300, vocab 301" in " ".join(res.output.split())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bad = runner.invoke(app, ["convert", str(tmp_path / "nope.gguf"), str(tmp_path / "out2")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "error:" in bad.output and "does not exist" in bad.output
    bad = runner.invoke(app, ["convert", str(made.path), str(tmp_path / "out3"), "--dtype", "float16"])
    assert bad.exit_code == 2 and "--dtype must be bfloat16 or float32" in bad.output
