"""Dream-format model → GGUF with llama.cpp's `dream` architecture (what its converter writes for Dream-v0).

The `gguf` library writes the bytes and quantizes; this module decides names, metadata and per-tensor types:

- architecture `dream`: Qwen2's tensors and hyperparameters, `dream.attention.causal = false`, the mask token as
  `tokenizer.ggml.mask_token_id` and `diffusion.shift_logits = true` (position j is scored by the output at j - 1,
  as our sampler does; llama.cpp's diffusion example also assumes it for Dream when the key is absent).
- Q and K are written in HF's row order: llama.cpp ropes `dream` as NEOX (pairs i, i + D/2, our `apply_rope`), so the
  Llama-only interleaving permutation is not applied, whatever shape the source model had.
- llama.cpp's `dream` graph always adds q/k/v biases, so a model without them (SmolLM2's Llama shape) gets zero
  biases (the same function) and `dreamlm.attention_bias = false`, which our importer reads back to drop them.
- Tokenizer: byte-level BPE as `gpt2` tokens, merges and token types; a one-character tokenizer (the puzzle models)
  as the same with each character spelled in byte-level form. 1-D tensors stay F32, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamlm.errors import DreamError
from dreamlm.files import output_file
from dreamlm.formats.gguf import BIAS_KEY, BLOCK_TENSORS, CONTROL, TOP_TENSORS, UNUSED, USER_DEFINED
from dreamlm.model import DreamModel
from dreamlm.tokenizer import QWEN2_SPLIT, DreamTokenizer

ARCH = "dream"
NORMAL = 1  # llama.cpp's token type of plain vocabulary entries
# llama.cpp needs a merges array for a `gpt2` tokenizer and the gguf library cannot write an empty one; a merge whose
# halves are whole special tokens can never fire (BPE starts from single characters), so it changes nothing
PLACEHOLDER_MERGE = "<|endoftext|> <|endoftext|>"

HF_TO_GGUF_TOP = {hf: name for name, hf in TOP_TENSORS.items()}
HF_TO_GGUF_BLOCK = {hf: name for name, hf in BLOCK_TENSORS.items()}


def export_types() -> dict[str, Any]:
    """--type name → (GGML type of 2-D weights, llama.cpp file type), as llama.cpp names them."""
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}


# written by llama.cpp's own quantizer (the gguf library cannot write k-quants): needs the `[llamacpp]` extra
LLAMA_QUANTIZED = {"q4_k": "Q4_K_M"}


def check_type(type: str) -> dict[str, Any]:
    """The export types, or DreamError naming them (and where a llama.cpp type we cannot write comes from)."""
    types = export_types()
    if type in LLAMA_QUANTIZED:
        from dreamlm.formats.llamacpp import INSTALL_HINT, require_llama_cpp

        try:
            require_llama_cpp()
        except DreamError:
            raise DreamError(f"--type {type} is written by llama.cpp's quantizer (the gguf library cannot write "
                             f"k-quants), which needs llama-cpp-python: {INSTALL_HINT}") from None
        return types
    if type not in types:
        names = [*types, *LLAMA_QUANTIZED]
        hint = ""
        if type.lower().startswith(("q2", "q3", "q4", "q5", "q6", "iq")):
            hint = (" (the gguf library cannot quantize to it: export f16 and run llama.cpp's llama-quantize, "
                    f"e.g. llama-quantize model-f16.gguf model-{type}.gguf {type.upper()})")
        raise DreamError(f"--type must be one of {', '.join(names)}, got {type!r}{hint}")
    return types


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name of a HF tensor name (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`)."""
    if hf_name in HF_TO_GGUF_TOP:
        return HF_TO_GGUF_TOP[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_TO_GGUF_BLOCK:
        return f"blk.{parts[2]}.{HF_TO_GGUF_BLOCK[parts[3]]}"
    raise DreamError(f"tensor {hf_name} has no place in llama.cpp's dream architecture")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character map (the spelling of byte-level BPE tokens)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:  # control bytes, space, DEL, ... move past 255 so every token prints
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer_name(spec: dict[str, Any]) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's (normalizer, pre_tokenizer), or None if unknown."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not norm:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and not norm:
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and not parts[1].get("use_regex", True) and norm.get("type") == "NFC"):
        return "qwen2"
    return None


def gguf_vocab(tokenizer: DreamTokenizer, vocab_size: int) -> dict[str, Any]:
    """tokens (padded to the embedding's rows), token types, merges and pre-tokenizer name in llama.cpp's form."""
    spec = json.loads(tokenizer._tok.to_str())
    model = spec["model"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if model["type"] == "BPE":
        pre = _pre_tokenizer_name(spec)
        if pre is None:
            raise DreamError("the tokenizer's pre-tokenizer is none of llama.cpp's qwen2, smollm or gpt-2; llama.cpp "
                             "would split text differently, so it is not exported")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        vocab, words = dict(model["vocab"]), set()
    elif model["type"] == "WordLevel":
        # the puzzle tokenizers: one token per character, plus whole words (star graphs' edges such as "10>11")
        # that their split pattern takes before single characters. A character becomes a byte-level token (no
        # merges: BPE leaves it alone); a word becomes a user-defined token, which llama.cpp (like the tokenizers
        # library) cuts out of the text before BPE runs, longest first
        alphabet = byte_level_alphabet()
        vocab, words = {}, set()
        for token, i in model["vocab"].items():
            if i in added:
                continue
            raw = token.encode("utf-8")
            if len(raw) == 1:
                vocab[alphabet[raw[0]]] = i
            else:
                vocab[token] = i
                words.add(i)
        pre, merges = "gpt-2", []
    else:
        raise DreamError(f"a {model['type']} tokenizer cannot be written for llama.cpp (byte-level BPE or one "
                         "character per token only)")
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        if i >= vocab_size:
            raise DreamError(f"token id {i} lies past the model's {vocab_size} embedding rows")
        tokens[i], types[i] = token, USER_DEFINED if i in words else NORMAL
    for i, t in added.items():
        if i >= vocab_size:
            raise DreamError(f"token id {i} lies past the model's {vocab_size} embedding rows")
        tokens[i], types[i] = t["content"], CONTROL if t.get("special", True) else USER_DEFINED
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # the converter's filler name
    return {"pre": pre, "tokens": names, "types": types, "merges": merges or [PLACEHOLDER_MERGE]}


def _tensor_type(name: str, tensor: torch.Tensor, kind: Any) -> Any:
    import gguf

    Q = gguf.GGMLQuantizationType
    if tensor.dim() == 1:  # norms and biases: llama.cpp keeps them F32 at every file type
        return Q.F32
    if kind == Q.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows not a whole number of 32-blocks: llama.cpp's converter falls back the same way
    return kind


def export_gguf(model: DreamModel, tokenizer: DreamTokenizer, out: str | Path, type: str = "f16",
                name: str | None = None) -> Path:
    """Write `model` as a llama.cpp `dream` GGUF with its tokenizer and chat template; returns the path."""
    import gguf

    types = check_type(type)
    out = output_file(out)
    if type in LLAMA_QUANTIZED:  # f32 first, then llama.cpp's quantizer (its Q4_K_M mix and shape fallbacks)
        from dreamlm.formats.llamacpp import quantize_gguf

        full = out.with_name(out.name + ".f32.tmp")
        try:
            export_gguf(model, tokenizer, full, type="f32", name=name)
            return quantize_gguf(full, out, type)
        finally:
            full.unlink(missing_ok=True)
    cfg = model.config
    if cfg.causal:
        raise DreamError("this is a causal (AR) model; llama.cpp's dream architecture is bidirectional — convert it "
                         "to a diffusion model first (dreamlm convert)")
    if cfg.mask_token_id is None:
        raise DreamError("the model has no mask token id; llama.cpp's diffusion loop needs one")
    if cfg.dim_per_head * cfg.num_attention_heads != cfg.hidden_size:
        raise DreamError(f"heads x head_dim ({cfg.num_attention_heads} x {cfg.dim_per_head}) must equal hidden_size "
                         f"({cfg.hidden_size}) for llama.cpp's dream graph")
    kind, file_type = types[type]
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)

    w = gguf.GGUFWriter(str(out), ARCH)
    w.add_name(name or (tokenizer.source.name if tokenizer.source else "dreamlm"))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_causal_attention(False)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_diffusion_shift_logits(True)
    if not cfg.attention_bias:
        w.add_bool(BIAS_KEY, False)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_mask_token_id(cfg.mask_token_id)
    w.add_add_bos_token(False)  # Dream prompts carry no BOS
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}  # a tied head: llama.cpp reuses token_embd
    if not cfg.attention_bias:
        for layer in range(cfg.num_hidden_layers):
            for proj in ("q", "k", "v"):
                weight = state[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
                state[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = torch.zeros(weight.shape[0])
    for hf_name, tensor in state.items():
        target = gguf_tensor_name(hf_name)
        data = tensor.detach().float().cpu().numpy().astype(np.float32)
        qtype = _tensor_type(target, tensor, kind)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(target, gguf.quants.quantize(data, qtype))
        else:
            w.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def export_model(model: str | Path, out: str | Path, type: str = "f16") -> Path:
    """Load a Dream-format model directory (or bundled/pulled name) and write it as a llama.cpp `dream` GGUF."""
    from dreamlm.hub import resolve

    check_type(type)
    output_file(out)  # refuse an unwritable path before loading anything
    path = resolve(str(model))
    # the stored dtype; each tensor goes to float32 only as it is written (peak memory about one model)
    loaded = DreamModel.from_pretrained(path)  # an adapter directory is merged on load
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise DreamError(f"{path} has no tokenizer files; a GGUF carries its tokenizer, so export needs them")
    return export_gguf(loaded, tokenizer, out, type=type, name=Path(path).name)
