"""Tiny GGUF files written by the tests themselves, laid out as llama.cpp's converter lays out the real ones.

A small byte-level BPE is trained here (specials first, as SmolLM's), a random HF Llama or Qwen2 is built with
transformers, and its tensors are written with `gguf.GGUFWriter` in the quant types of the shipped SmolLM2 file:
token_embd Q8_0, matrices Q4_1, norms (and biases) F32; Llama's Q and K rows permuted as llama.cpp permutes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

import gguf
from dreamlm.formats.gguf import permute_rotary

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
CORPUS = [
    "def reverse(s: str) -> str:\n    return s[::-1]\n",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "for i in range(10):\n    print(i * 2, 'done')\n",
    "Ünïcödé text — naïve café, 日本語 and emoji 🙂 too.",
    "1234567890 + 42 = 1234567932; version 3.11.2, 2024-12-04",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
] * 4
TEXTS = ["def add(a, b):\n    return a + b  # sum", "Ünïcödé — 日本語 🙂 naïve", "x = 12345 + 678.9e-3",
         "  two  spaces\n\n\tand tabs  ", "<|im_start|>user\nhi<|im_end|>\n"]


@dataclass
class TinyGGUF:
    """A written GGUF and what it was made from."""

    path: Path
    hf: torch.nn.Module  # the random source model (float32, before quantization)
    tokens: list[str]
    arch: str


def train_bpe(vocab_size: int = 300, pre: str = "smollm") -> tuple[list[str], list[str]]:
    """Token strings (in id order, byte-level spelling, specials first) and merges of a small trained BPE."""
    tok = Tokenizer(BPE(unk_token=None))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def hf_model(arch: str, vocab: int, seed: int = 0, tied: bool = True) -> torch.nn.Module:
    """A random tiny HF causal LM (2 layers, hidden 64, 4 heads / 2 KV heads, head dim 16)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=100000.0,
                  tie_word_embeddings=tied)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # norms and biases away from their trivial init, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model.eval()


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a HF tensor."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def quant_type(gguf_tensor: str) -> gguf.GGMLQuantizationType:
    """The shipped file's choice: embeddings (and an untied head) Q8_0, matrices Q4_1, 1-D tensors F32."""
    Q = gguf.GGMLQuantizationType
    if gguf_tensor in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    if gguf_tensor.endswith(".bias") or "norm" in gguf_tensor:
        return Q.F32
    return Q.Q4_1


def write_tiny_gguf(path: Path, arch: str = "llama", pre: str | None = None, tied: bool | None = None,
                    seed: int = 0) -> TinyGGUF:
    """Write a tiny `arch` GGUF (llama: tied head, smollm pre-tokenizer; qwen2: untied head, qwen2 pre)."""
    pre = pre or ("smollm" if arch == "llama" else "qwen2")
    tied = (arch == "llama") if tied is None else tied
    tokens, merges = train_bpe(300, "smollm" if pre == "smollm" else "gpt2")
    model = hf_model(arch, len(tokens), seed, tied)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        t = tensor.detach().float()
        target = gguf_name(name)
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in target else cfg.num_key_value_heads
            t = permute_rotary(t, heads)  # what llama.cpp's converter does to Llama's Q and K
        qtype = quant_type(target)
        data = t.numpy().astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(target, data)
        else:
            w.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(path, model, tokens, arch)
