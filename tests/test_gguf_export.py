"""GGUF export (llama.cpp's `dream` architecture): the metadata, tensor names, shapes and types read back with the
`gguf` reader, and the round trip through our own importer (f32 exact, f16/bf16 their rounding, q8_0 within one
quantization step). llama.cpp itself is not needed (nor built) here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gguf
from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.formats.gguf import BIAS_KEY, BLOCK_TENSORS, CONTROL, UNUSED, USER_DEFINED, gguf_to_dream
from dreamlm.formats.gguf_export import (NORMAL, PLACEHOLDER_MERGE, byte_level_alphabet, export_gguf, export_model,
                                         gguf_tensor_name)
from dreamlm.hub import resolve
from dreamlm.model import DreamModel
from dreamlm.tokenizer import DreamTokenizer

runner = CliRunner()
Q = gguf.GGMLQuantizationType
TEXT = "def add(a, b):\n    return a + b  # Ünïcödé 日本語"


def fields(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (shape in HF order, type name)) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}
    return meta, tensors


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> DreamModel:
    return DreamModel.from_pretrained(tiny_dir, dtype=torch.float32)


def test_metadata_is_what_llama_cpp_reads_for_dream(tiny, tiny_dir, tmp_path):
    path = export_model(tiny_dir, tmp_path / "m.gguf", type="f16")
    meta, tensors = fields(path)
    cfg, tok = tiny.config, tiny.tokenizer
    expected = {
        "general.architecture": "dream", "dream.block_count": 2, "dream.context_length": 256,
        "dream.embedding_length": 64, "dream.feed_forward_length": 128, "dream.attention.head_count": 4,
        "dream.attention.head_count_kv": 2, "dream.rope.freq_base": 10000.0, "dream.vocab_size": cfg.vocab_size,
        "dream.attention.causal": False, "diffusion.shift_logits": True, "general.file_type": 1,
        "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.mask_token_id": cfg.mask_token_id, "tokenizer.ggml.eos_token_id": cfg.eos_token_id,
        "tokenizer.ggml.bos_token_id": cfg.bos_token_id, "tokenizer.ggml.padding_token_id": cfg.pad_token_id,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": tok.chat_template,
    }
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["dream.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert BIAS_KEY not in meta  # a Qwen2-shaped model: its biases are real
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size == tensors["token_embd.weight"][0][0]
    assert tokens[cfg.mask_token_id] == "<|mask|>" and types[cfg.mask_token_id] == CONTROL
    n = tok.vocab_size
    assert all(t == f"[PAD{i}]" and k == UNUSED for i, (t, k) in enumerate(zip(tokens, types)) if i >= n)
    assert [tok.token_to_id(t) for t in tokens[:n]] == list(range(n))
    merges = json.loads(tok._tok.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_tensor_names_shapes_and_types(tiny, tmp_path):
    _, tensors = fields(export_gguf(tiny, tiny.tokenizer, tmp_path / "m.gguf", type="q8_0"))
    state = tiny.state_dict()
    assert set(tensors) == {gguf_tensor_name(k) for k in state}
    assert "blk.1.attn_q.bias" in tensors and "output.weight" in tensors  # untied head, Qwen2 biases
    for name, tensor in state.items():
        shape, kind = tensors[gguf_tensor_name(name)]
        assert shape == tuple(tensor.shape), name
        assert kind == ("F32" if tensor.dim() == 1 else "Q8_0"), name


def test_tensor_names_follow_llama_cpp():
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    for gguf_name, hf_name in BLOCK_TENSORS.items():  # the importer's table, inverted
        assert gguf_tensor_name(f"model.layers.7.{hf_name}") == f"blk.7.{gguf_name}"
    with pytest.raises(DreamError, match="no place in llama.cpp's dream architecture"):
        gguf_tensor_name("model.layers.0.self_attn.o_proj.bias")


def test_byte_level_alphabet_is_gpt2s():
    table = byte_level_alphabet()
    assert len(set(table.values())) == 256 and table[ord("\n")] == "Ċ" and table[ord(" ")] == "Ġ"
    assert table[ord("a")] == "a"
    from tokenizers import pre_tokenizers

    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_through_convert(tiny, tiny_dir, tmp_path, kind):
    path = export_model(tiny_dir, tmp_path / f"m-{kind}.gguf", type=kind)
    back = DreamModel.from_pretrained(gguf_to_dream(path, tmp_path / "back", dtype="float32"))
    ours, theirs = tiny.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for name, w in ours.items():
        got = theirs[name]
        if kind == "f32" or w.dim() == 1:
            assert torch.equal(got, w), name
        elif kind in ("f16", "bf16"):
            assert torch.equal(got, w.to(torch.float16 if kind == "f16" else torch.bfloat16).float()), name
        else:  # q8_0: within one step of its 32-wide blocks (block max / 127), never more
            step = w.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
            assert bool(((got - w).reshape(-1, 32).abs() <= step * 1.01 + 1e-7).all()), name
            assert not torch.equal(got, w)
    a, b = dataclasses.asdict(tiny.config), dataclasses.asdict(back.config)
    a.pop("extras"), b.pop("extras")
    assert a == b
    assert back.tokenizer.encode(TEXT) == tiny.tokenizer.encode(TEXT)
    assert back.tokenizer.decode(back.tokenizer.encode(TEXT)) == TEXT
    assert back.tokenizer.chat_template == tiny.tokenizer.chat_template
    assert back.tokenizer.mask_token_id == tiny.config.mask_token_id
    if kind == "f32":
        ids = torch.tensor([tiny.tokenizer.encode(TEXT)])
        with torch.no_grad():
            assert torch.equal(back(ids), tiny(ids))


def test_llama_shaped_model_gets_zero_biases_and_comes_back_without_them(tiny, tmp_path):
    cfg = dataclasses.replace(tiny.config, attention_bias=False, tie_word_embeddings=True)
    model = DreamModel(cfg).init_weights(3).eval()
    path = export_gguf(model, tiny.tokenizer, tmp_path / "llama.gguf", type="f32")
    meta, tensors = fields(path)
    assert meta[BIAS_KEY] is False and "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    reader = gguf.GGUFReader(path)
    biases = [t for t in reader.tensors if t.name.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias"))]
    assert len(biases) == 3 * cfg.num_hidden_layers and all(not np.any(t.data) for t in biases)
    back = DreamModel.from_pretrained(gguf_to_dream(path, tmp_path / "back", dtype="float32"))
    assert not back.config.attention_bias and back.config.tie_word_embeddings
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", ["sudoku4-diffusion", "star-2-5-diffusion"])
def test_bundled_puzzle_models_export_and_read_back(name, tmp_path):
    result = runner.invoke(app, ["export", name, str(tmp_path / "m.gguf"), "--type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "q8_0" in result.output
    meta, _ = fields(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.merges"] == [PLACEHOLDER_MERGE]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    source = DreamTokenizer.from_pretrained(resolve(name))
    newline = source.token_to_id("\n")
    if newline is not None:  # one character: spelled in byte-level form
        assert tokens[newline] == "Ċ" and types[newline] == NORMAL
    words = [t for t, k in zip(tokens, types) if k == USER_DEFINED]
    assert (len(words) > 0) == name.startswith("star")  # star graph edges ("10>11") are whole tokens
    back = DreamModel.from_pretrained(gguf_to_dream(tmp_path / "m.gguf", tmp_path / "back", dtype="float32"))
    text = ("0403\n3042\n0234\n4001" if name.startswith("sudoku") else
            "|".join(w for w in words[:6]) + "/" + words[0].split(">")[0] + "=")
    assert back.tokenizer.encode(text) == source.encode(text)
    assert back.config.mask_token_id == source.mask_token_id


@pytest.mark.parametrize(("args", "message"), [
    (["--type", "q5_k"], "--type must be one of f32, f16, bf16, q8_0, q4_k, got 'q5_k' (the gguf library cannot"),
    (["--type", "int8"], "--type must be one of f32, f16, bf16, q8_0, q4_k, got 'int8'"),
])
def test_bad_type_is_one_line(tiny_dir, tmp_path, args, message):
    result = runner.invoke(app, ["export", str(tiny_dir), str(tmp_path / "m.gguf"), *args])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: ") and message in result.output
    assert not (tmp_path / "m.gguf").exists()


def test_bad_paths_and_models_are_one_line(tiny_dir, tmp_path):
    cases = [
        (["export", str(tiny_dir), "/proc/m.gguf"], "cannot write /proc/m.gguf"),
        (["export", str(tiny_dir), str(tmp_path)], "is a folder; give a file name to write"),
        (["export", str(tmp_path / "nope"), str(tmp_path / "m.gguf")], "does not exist"),
        (["export", "sudoku4-ar", str(tmp_path / "m.gguf")], "this is a causal (AR) model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, (args, result.output)
        assert result.output.startswith("error: ") and message in " ".join(result.output.split()), result.output


def test_q4_k_without_llama_cpp_says_which_extra(tiny_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    for args in (["--type", "q4_k"], ["--type", "f32", "--check"]):
        result = runner.invoke(app, ["export", str(tiny_dir), str(tmp_path / "m.gguf"), *args])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "pip install 'dreamlm[llamacpp]'" in result.output
        assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--peer", "ollama"], "--peer must be llamacpp, got 'ollama'"),
    (["--peer-model", "sudoku4-diffusion"], "--peer-model and --llama-diffusion-cli go with --peer llamacpp"),
    (["--peer", "llamacpp", "--dtype", "float16"], "--peer llamacpp compares float32 or bfloat16"),
    (["--peer", "llamacpp", "--peer-model", "nope"], "unknown model 'nope'"),
    (["--peer", "llamacpp", "--llama-diffusion-cli", "/nonexistent/cli"], "/nonexistent/cli does not exist"),
    (["--peer", "llamacpp", "--peer-threads", "0"], "--peer-threads must be >= 1, got 0"),
])
def test_bench_peer_bad_input_is_one_line(args, message):
    result = runner.invoke(app, ["bench", "speed", *args])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: ") and message in result.output
