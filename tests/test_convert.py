"""`dreamlm convert`: a causal Qwen2 / Llama becomes a Dream directory whose causal logits are the source's."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dreamlm.checkpoint import convert_ar_checkpoint
from dreamlm.cli import app
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.tokenizer import DreamTokenizer

transformers = pytest.importorskip("transformers")


def write_ar_tokenizer(tokenizer, path, with_mask: bool):
    """vocab.json + merges.txt, specials <|endoftext|> (and <|mask|> if asked) right after the merges."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer._tok.model.save(str(path))
    base = len(json.loads((path / "vocab.json").read_text()))
    specials = ["<|endoftext|>"] + (["<|mask|>"] if with_mask else [])
    config = {"added_tokens_decoder": {str(base + i): {"content": s, "special": True} for i, s in enumerate(specials)},
              "eos_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return base + len(specials)


def source_model(kind: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=10000.0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=500000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind, extra_rows, with_mask", [("qwen2", 0, False), ("llama", 8, False),
                                                         ("qwen2", 0, True)])
def test_converted_model_reproduces_source_logits(tmp_path, tokenizer, kind, extra_rows, with_mask):
    src = tmp_path / "src"
    n_tok = write_ar_tokenizer(tokenizer, src, with_mask)
    vocab = n_tok + extra_rows
    hf = source_model(kind, vocab)
    hf.save_pretrained(src)
    converted = convert_ar_checkpoint(src, tmp_path / "dream")
    cfg = json.loads((tmp_path / "dream" / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    mask_id = cfg["mask_token_id"]
    tok = DreamTokenizer.from_pretrained(tmp_path / "dream")
    assert tok.mask_token_id == mask_id and tok.token_to_id("<|mask|>") == mask_id
    if with_mask:
        assert mask_id == n_tok - 1 and cfg["vocab_size"] == vocab  # reused, nothing grows
    elif extra_rows:
        assert mask_id == n_tok and cfg["vocab_size"] == vocab  # took an unused row
    else:
        assert mask_id == n_tok and cfg["vocab_size"] == vocab + 1  # grew by one row
    ours = DreamModel.from_pretrained(tmp_path / "dream", causal=True)
    x = torch.randint(0, n_tok - 2, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=x).logits
        got = ours(x)[..., :vocab]
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert converted.config.mask_token_id == mask_id


def test_cli_convert_and_refusals(tmp_path, tokenizer):
    src = tmp_path / "src"
    n_tok = write_ar_tokenizer(tokenizer, src, with_mask=False)
    source_model("qwen2", n_tok).save_pretrained(src)
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert DreamModel.from_pretrained(tmp_path / "out").config.mask_token_id == n_tok
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "not model_type 'gpt2'" in res.stderr
    cfg.update(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DreamError, match="plain RoPE only"):
        convert_ar_checkpoint(src, tmp_path / "out3")
