"""Tiny random checkpoints in the real Dream format: for tests, benches and the bundled fixture model.

`python -m dreamlm.tiny OUT_DIR` writes one: a Qwen2-style byte-level BPE trained here with `tokenizers`
(vocab.json + merges.txt + tokenizer_config.json, specials appended after the merges as in Qwen2), and a randomly
initialised bidirectional Qwen2 whose head is wider than the tokenizer, as Dream's is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dreamlm.config import DreamConfig
from dreamlm.model import DreamModel
from dreamlm.tokenizer import DreamTokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A diffusion language model writes the whole answer at once and refines it step by step.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "import json\nprint(json.dumps({'name': 'dream', 'steps': 512}))\n",
    "Sudoku, Countdown and path finding are planning tasks where seeing the whole answer helps.",
    "Hello, world! How are you today? I am fine, thank you.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Once upon a time there was a small model that learned to fill in the blanks.",
    "1 + 1 = 2, 2 * 3 = 6, 10 - 4 = 6, 12 / 4 = 3",
]


def tiny_tokenizer() -> DreamTokenizer:
    """The fixture tokenizer: a ~500-id BPE trained on the small built-in corpus."""
    return train_tokenizer(CORPUS * 20)


def save_tokenizer_dream_format(tokenizer: DreamTokenizer, path: str | Path) -> None:
    """Write vocab.json + merges.txt + tokenizer_config.json (no tokenizer.json), as Dream-v0 ships."""
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer._tok.model.save(str(path))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer.config, indent=2) + "\n", encoding="utf-8")


def tiny_config(tokenizer: DreamTokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate_size: int = 128, context: int = 256) -> DreamConfig:
    """A small Dream config whose vocabulary covers the tokenizer, padded to a multiple of 64 like Dream's."""
    vocab = ((tokenizer.vocab_size + 63) // 64) * 64
    if vocab == tokenizer.vocab_size:
        vocab += 64
    eos = tokenizer.eos_token_id
    return DreamConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=context, rope_theta=10000.0, max_window_layers=layers,
                       mask_token_id=tokenizer.mask_token_id, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos,
                       extras={"architectures": ["DreamModel"],
                               "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                                            "AutoModel": "modeling_dream.DreamModel"},
                               "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": True})


def make_tiny_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                         max_shard_size: int | str = "5GB", **shape: int) -> DreamModel:
    """Write a random tiny Dream checkpoint directory and return the model (in `dtype`)."""
    tokenizer = tiny_tokenizer()
    model = DreamModel(tiny_config(tokenizer, **shape)).init_weights(seed).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    save_tokenizer_dream_format(tokenizer, path)
    return model


def main() -> None:
    """Command line: write a tiny random checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    make_tiny_checkpoint(args.out, seed=args.seed, hidden_size=args.hidden_size, layers=args.layers)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
