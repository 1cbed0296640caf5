"""DreamModel: parity with transformers' Qwen2, bidirectional attention, padding."""

from __future__ import annotations

import pytest
import torch

from dreamlm.config import DreamConfig
from dreamlm.model import DreamModel

transformers = pytest.importorskip("transformers")


def small_config(**kw) -> DreamConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, mask_token_id=95,
                pad_token_id=94, bos_token_id=94, eos_token_id=94)
    base.update(kw)
    return DreamConfig(**base)


def hf_qwen2(seed: int = 0):
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias path count in the comparison
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_causal_matches_transformers_qwen2():
    hf = hf_qwen2()
    ours = DreamModel(small_config(), causal=True)
    missing = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    ours.eval()
    x = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=x).logits
        got = ours(x)
    assert got.shape == (3, 17, 96)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_causal_left_padding_matches_transformers_qwen2():
    hf = hf_qwen2(1)
    ours = DreamModel(small_config(), causal=True)
    ours.load_state_dict(hf.state_dict())
    ours.eval()
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, mask, pos)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)


def test_bidirectional_sees_the_future_and_causal_does_not():
    torch.manual_seed(0)
    model = DreamModel(small_config()).init_weights(0).eval()
    x = torch.randint(0, 90, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 90
    with torch.no_grad():
        a, b = model(x), model(y)
        assert not torch.allclose(a[0, :5], b[0, :5])  # later token changes earlier logits
        model.causal = True
        a, b = model(x), model(y)
        assert torch.equal(a[0, :-1], b[0, :-1])


def test_left_padding_row_equals_unpadded_and_no_nan():
    model = DreamModel(small_config()).init_weights(3).eval()
    prompt = torch.randint(0, 90, (1, 7), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.full((1, 4), 94), prompt], dim=1)
    other = torch.randint(0, 90, (1, 11), generator=torch.Generator().manual_seed(3))
    batch = torch.cat([padded, other])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        alone = model(prompt)
        together = model(batch, mask)
    assert torch.isfinite(together).all()
    assert torch.allclose(together[0, 4:], alone[0], atol=1e-5)
    # the pads' content does not leak into real positions
    batch2 = batch.clone()
    batch2[0, :4] = 3
    with torch.no_grad():
        together2 = model(batch2, mask)
    assert torch.allclose(together2[0, 4:], together[0, 4:], atol=1e-6)


def test_bfloat16_forward_is_finite():
    model = DreamModel(small_config()).init_weights(0).to(torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 90, (2, 10)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_gqa_and_tied_embeddings():
    model = DreamModel(small_config(num_key_value_heads=1, tie_word_embeddings=True)).init_weights(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert model(torch.randint(0, 90, (1, 5))).shape == (1, 5, 96)
