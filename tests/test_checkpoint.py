"""Config and checkpoint directories: real Dream layout, sharding, round trips, errors by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamlm.checkpoint import inspect_checkpoint, parse_size, shard_names
from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel

# config.json of Dream-org/Dream-v0-Instruct-7B (all of its keys)
DREAM_V0_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}


def test_real_dream_config_reads_and_round_trips():
    c = DreamConfig.from_dict(DREAM_V0_CONFIG)
    assert (c.num_hidden_layers, c.hidden_size, c.dim_per_head, c.mask_token_id) == (28, 3584, 128, 151666)
    assert c.context_length == 2048 and not c.causal
    assert c.to_dict() == DREAM_V0_CONFIG


def test_plain_qwen2_config_reads():
    transformers = pytest.importorskip("transformers")
    d = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=100).to_dict()
    c = DreamConfig.from_dict(d)
    assert c.model_type == "qwen2" and c.rope_theta == 10000.0 and c.mask_token_id is None


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"hidden_sizes": 3}, "unknown key(s) hidden_sizes"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"mask_token_id": 999999}, "mask_token_id=999999 is outside the vocabulary"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling"),
])
def test_bad_config_errors(change, message):
    with pytest.raises(DreamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DreamConfig.from_dict({**DREAM_V0_CONFIG, **change})


def test_sharded_checkpoint_is_in_the_real_layout(tiny_dir):
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert "model.safetensors.index.json" in names and "config.json" in names
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.layers.0.self_attn.q_proj.bias" in index["weight_map"]
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
    stored = load_file(str(tiny_dir / shards[0]))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())


def test_load_keeps_stored_dtype_or_converts(tiny_dir):
    assert DreamModel.from_pretrained(tiny_dir).dtype == torch.bfloat16
    m = DreamModel.from_pretrained(tiny_dir, dtype="float32")
    assert m.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert m.tokenizer is not None and m.tokenizer.mask_token_id == m.config.mask_token_id


@pytest.mark.parametrize("shard", ["5GB", "30KB"])
def test_save_load_round_trip(tmp_path, tiny_model, shard):
    tiny_model.save_pretrained(tmp_path / "out", max_shard_size=shard)
    again = DreamModel.from_pretrained(tmp_path / "out")
    for (n1, p1), (n2, p2) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randint(0, 400, (1, 9))
    with torch.no_grad():
        assert torch.equal(tiny_model(x), again(x))
    assert again.tokenizer is not None  # tokenizer files travel with the model
    # saving single-file over a sharded directory leaves no stale shards behind
    tiny_model.save_pretrained(tmp_path / "out", max_shard_size="5GB")
    assert not list((tmp_path / "out").glob("model-0*"))
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_checkpoint_without_tokenizer_loads(tmp_path, tiny_dir):
    target = tmp_path / "notok"
    shutil.copytree(tiny_dir, target)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (target / name).unlink()
    m = DreamModel.from_pretrained(target)
    assert m.tokenizer is None


def test_tied_embeddings_round_trip(tmp_path):
    c = DreamConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=64, mask_token_id=63, pad_token_id=62,
                    bos_token_id=62, eos_token_id=62, tie_word_embeddings=True)
    m = DreamModel(c).init_weights(0)
    m.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    again = DreamModel.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, m.lm_head.weight)


def _copy(tmp_path, tiny_dir):
    target = tmp_path / "broken"
    shutil.copytree(tiny_dir, target)
    return target


def _rewrite_shard_with(target, edit):
    index = json.loads((target / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    shard = target / index["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors, index, shard.name)
    save_file(tensors, str(shard))
    (target / "model.safetensors.index.json").write_text(json.dumps(index))


def test_error_missing_directory_and_config(tmp_path):
    with pytest.raises(DreamError, match="does not exist"):
        DreamModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(DreamError, match="no config.json"):
        DreamModel.from_pretrained(tmp_path)


def test_error_malformed_config(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)
    (target / "config.json").write_text("{not json")
    with pytest.raises(DreamError, match="not valid JSON"):
        DreamModel.from_pretrained(target)


def test_error_no_weights(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)
    for f in target.glob("model*"):
        f.unlink()
    with pytest.raises(DreamError, match="no model.safetensors or model.safetensors.index.json"):
        DreamModel.from_pretrained(target)


def test_error_missing_tensor_names_it(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)

    def drop(tensors, index, shard):
        del tensors["model.norm.weight"]
        del index["weight_map"]["model.norm.weight"]

    _rewrite_shard_with(target, drop)
    with pytest.raises(DreamError, match="missing tensor model.norm.weight"):
        DreamModel.from_pretrained(target)


def test_error_unexpected_tensor_names_it(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)

    def add(tensors, index, shard):
        tensors["model.extra.weight"] = torch.zeros(2)
        index["weight_map"]["model.extra.weight"] = shard

    _rewrite_shard_with(target, add)
    with pytest.raises(DreamError, match="unexpected tensor model.extra.weight"):
        DreamModel.from_pretrained(target)


def test_error_shape_mismatch_names_both_shapes(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)
    _rewrite_shard_with(target, lambda t, i, s: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(DreamError, match=r"model.norm.weight has shape \[65\].*needs \[64\]"):
        DreamModel.from_pretrained(target)


def test_error_missing_shard(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)
    next(target.glob("model-00002-*")).unlink()
    with pytest.raises(DreamError, match="model-00002-of-.*missing"):
        DreamModel.from_pretrained(target)


def test_error_corrupt_safetensors(tmp_path, tiny_dir):
    target = _copy(tmp_path, tiny_dir)
    next(target.glob("model-00001-*")).write_bytes(b"garbage")
    with pytest.raises(DreamError, match="not a readable safetensors file"):
        DreamModel.from_pretrained(target)


def test_inspect_counts_parameters(tiny_dir, tiny_model):
    info = inspect_checkpoint(tiny_dir)
    assert info.num_parameters == tiny_model.num_parameters()
    assert info.dtypes == ["BF16"] and info.has_tokenizer


def test_sizes_and_sharding():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("10KiB") == 10240 and parse_size(7) == 7
    with pytest.raises(DreamError):
        parse_size("lots")
    state = {f"t{i}": torch.zeros(10) for i in range(5)}  # 40 bytes each
    assert shard_names(state, 100) == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert shard_names(state, 10) == [[f"t{i}"] for i in range(5)]


@pytest.mark.parametrize("bad", ["int", "nan"])
def test_integer_or_nan_weights_are_refused(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    from dreamlm.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.norm.weight"
    tensors[name] = tensors[name].to(torch.int32) if bad == "int" else tensors[name].float().fill_(float("nan"))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    message = "holds int32 values; weights must be floating point" if bad == "int" else "holds NaN or infinite"
    with pytest.raises(DreamError, match=message):
        DreamModel.from_pretrained(tmp_path)
