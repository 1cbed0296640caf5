"""GGUF (llama.cpp's single-file format) → Dream-format directory; the names and token types shared with export.

The `gguf` library reads the file and dequantizes its tensors; this module only maps llama.cpp's names to HF's,
undoes the rotary permutation llama.cpp applies to Llama's Q and K weights, rebuilds the byte-level BPE tokenizer
from the file's metadata, and hands the result to the same mask-token step `dreamlm convert` uses for HF folders.

Supported: architectures `llama`, `qwen2` and `dream` (llama.cpp's name for Dream, as `dreamlm export` writes it:
already bidirectional with its mask token, so nothing is added); tokenizer model `gpt2` (byte-level BPE) with the
pre-tokenizers in `PRE_TOKENIZERS`. Anything else is refused with a message rather than converted into a model that
reads text or positions differently from the original. Writing GGUF files is `formats/gguf_export.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dreamlm.checkpoint import add_mask_token, ar_config_to_dream, model_from_tensors, resolve_dtype
from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.tokenizer import MASK, QWEN2_SPLIT, DreamTokenizer

ARCHITECTURES = ("llama", "qwen2", "dream")
# llama.cpp's token types (llama_token_type): 3 marks control tokens (specials), 4 user-defined added tokens,
# 5 unused ids (padding rows past the tokenizer, named [PAD<id>] by llama.cpp's converter).
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5
# dreamlm's own key in a `dream` GGUF (llama.cpp ignores it): false when the q/k/v biases are zero filler, written
# because llama.cpp's dream graph needs them though the model (SmolLM2's Llama shape) has none
BIAS_KEY = "dreamlm.attention_bias"

# llama.cpp name (after `blk.N.`) -> HF name (after `model.layers.N.`)
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ---- reading ------------------------------------------------------------------------------------------------------
def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over the file (memory-mapped), with errors that say what is wrong."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise DreamError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:  # the reader raises these on a bad magic/truncation
        raise DreamError(f"{path} is not a readable GGUF file: {exc}") from None


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of the file's header as Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own bookkeeping (version, counts)
            continue
        meta[key] = field.contents()
    return meta


def _float(value: float) -> float:
    # GGUF stores float32; the shortest decimal that round-trips (9.9999997e-06 -> 1e-05) is the original config value
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def gguf_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The HF config.json dict (model_type llama or qwen2) a GGUF's metadata describes."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise DreamError(f"GGUF architecture {arch!r} is not supported; dreamlm reads {', '.join(ARCHITECTURES)}")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None and required:
            raise DreamError(f"the GGUF header has no {arch}.{name}")
        return value

    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise DreamError(f"GGUF {arch}.rope.scaling.type = {scaling!r}: RoPE scaling is not supported (plain RoPE "
                         "only), refusing rather than producing a model whose positions differ from the original")
    if "rope_freqs.weight" in tensor_shapes:
        raise DreamError("this GGUF carries rope_freqs (Llama-3.1-style RoPE scaling), which is not supported")
    if "token_embd.weight" not in tensor_shapes:
        raise DreamError("the GGUF has no token_embd.weight")
    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise DreamError(f"partial rotary embeddings ({rotary} of {head_dim} dims) are not supported")
    vocab, width = tensor_shapes["token_embd.weight"]
    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "num_hidden_layers": int(key("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": _float(key("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": _float(key("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if width != hidden:
        raise DreamError(f"token_embd.weight is {width} wide but the header says embedding_length {hidden}")
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if arch in ("qwen2", "dream"):
        config["max_window_layers"] = config["num_hidden_layers"]
    if arch == "dream":
        mask = meta.get("tokenizer.ggml.mask_token_id")
        if not isinstance(mask, int) or not 0 <= mask < vocab:
            raise DreamError("this dream GGUF has no usable tokenizer.ggml.mask_token_id; a diffusion model needs one")
        config.update(model_type="Dream", causal=False, mask_token_id=mask,
                      attention_bias=bool(meta.get(BIAS_KEY, True)))
    return config


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's Q/K rows → llama.cpp's: within each head, interleave the two rotary halves (what its converter does)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K rows → HF's (the inverse of `permute_rotary`): RoPE pairs (i, i + D/2), as our model rotates."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(reader: Any, config: DreamConfig, arch: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantized tensor in `dtype`) for every tensor of the file, one at a time."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = TOP_TENSORS.get(t.name)
        if name is None:
            parts = t.name.split(".", 2)
            if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
                name = f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
            else:
                raise DreamError(f"GGUF tensor {t.name!r} has no place in a {arch} model")
        if name.endswith("_proj.bias") and not config.attention_bias:
            if np.any(dequantize(t.data, t.tensor_type)):  # only zero filler may be dropped
                raise DreamError(f"GGUF tensor {t.name} is not zero, but the header says the model has no q/k/v bias")
            continue
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise DreamError(f"GGUF tensor {t.name} is stored as {t.tensor_type.name}, which the gguf library cannot "
                             "dequantize") from None
        # the file lists dims innermost first; numpy's (rows, cols) is their reverse, which is HF's layout
        shape = tuple(int(d) for d in reversed(t.shape))
        tensor = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: F32 data is the mmap
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in t.name else config.num_key_value_heads
            tensor = unpermute_rotary(tensor, heads)
        if not bool(torch.isfinite(tensor).all()):
            raise DreamError(f"GGUF tensor {t.name} holds NaN or infinite values; the file is broken")
        yield name, tensor.to(dtype)


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def _smollm() -> tuple[Any, Any]:
    from tokenizers import pre_tokenizers

    # llama.cpp's "smollm": every digit alone, then GPT-2's split (as SmolLM's own tokenizer.json)
    return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _gpt2() -> tuple[Any, Any]:
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _qwen2() -> tuple[Any, Any]:
    from tokenizers import Regex, normalizers, pre_tokenizers

    return normalizers.NFC(), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer) of the byte-level BPE
PRE_TOKENIZERS = {"smollm": _smollm, "gpt-2": _gpt2, "qwen2": _qwen2}


def gguf_tokenizer(meta: dict[str, Any]) -> DreamTokenizer:
    """The byte-level BPE a GGUF's tokenizer.ggml.* metadata describes, with its specials and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise DreamError(f"GGUF tokenizer model {model!r} is not supported; dreamlm reads byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise DreamError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))}); "
                         "a wrong one would split text differently from the model's training")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise DreamError("the GGUF has no tokenizer.ggml.tokens / merges; cannot build its tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind != UNUSED:  # padding rows are no tokens: text spelling "[PAD70]" must not become one
            vocab.setdefault(token, i)  # a repeated placeholder keeps its first id
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise DreamError(f"GGUF merge {merge!r} is not a 'left right' pair")
        if left + right not in vocab:
            # a merge that builds no token never fires (dreamlm export writes one when a tokenizer has no merges,
            # since llama.cpp requires the array); the tokenizers library would refuse it
            continue
        pairs.append((left, right))
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]()
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    added = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED) and vocab.get(token) == i:
            # control tokens are specials (whole in text, skippable in output); user-defined ones plain added tokens
            special = kind == CONTROL
            if special:
                tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            else:
                tok.add_tokens([AddedToken(token, special=False, normalized=False)])
            added[str(i)] = {"content": token, "special": special, "normalized": False, "lstrip": False,
                             "rstrip": False, "single_word": False}

    def token_at(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    config = {
        "added_tokens_decoder": added,
        "bos_token": token_at("bos_token_id"),
        "eos_token": token_at("eos_token_id"),
        "pad_token": token_at("padding_token_id"),
        "unk_token": token_at("unknown_token_id"),
        **({"mask_token": token_at("mask_token_id")} if token_at("mask_token_id") else {}),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048)),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return DreamTokenizer(tok, config)


# ---- the whole conversion -----------------------------------------------------------------------------------------
def gguf_model(gguf_path: str | Path, dtype: str | torch.dtype = "bfloat16") -> tuple[DreamModel, DreamTokenizer]:
    """The GGUF's model as a (bidirectional) DreamModel in `dtype`, and its tokenizer; an AR (llama/qwen2) file has
    no mask token yet, a `dream` file has its own."""
    dtype = resolve_dtype(dtype)
    reader = open_gguf(gguf_path)
    meta = gguf_metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    raw = gguf_config(meta, shapes)
    config = DreamConfig.from_dict(raw if raw["model_type"] == "Dream" else ar_config_to_dream(raw))
    tokenizer = gguf_tokenizer(meta)
    tensors = dict(gguf_tensors(reader, config, meta["general.architecture"], dtype))
    model = model_from_tensors(config, tensors, source=str(gguf_path), causal=False)
    return model, tokenizer


def gguf_to_dream(gguf_path: str | Path, out_dir: str | Path, dtype: str | torch.dtype = "bfloat16",
                  mask_token: str = MASK, max_shard_size: int | str = "5GB") -> Path:
    """Convert a Llama / Qwen2 GGUF into a Dream-format directory (weights dequantized to `dtype`, config,
    tokenizer with chat template and the mask token added as `dreamlm convert` adds it), or read a `dream` GGUF
    (dreamlm's own export) back as it was; returns out_dir."""
    model, tokenizer = gguf_model(gguf_path, dtype)
    if model.config.mask_token_id is None:  # an AR source; a dream file keeps its own mask token
        add_mask_token(model, tokenizer, mask_token)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, tokenizer=tokenizer)
    return out_dir
