"""Objectives: CART weights, hand-computed losses, masking rules, the MC ELBO against exact enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.training.objective import (DiffusionObjective, ar_loss, cart_weights, diffusion_loss, elbo_loglik,
                                        mask_span, mask_tokens, sample_times, token_weights)


def cart_direct(masked: torch.Tensor, p: float) -> torch.Tensor:
    B, L = masked.shape
    out = torch.zeros(B, L)
    for b in range(B):
        for n in range(L):
            out[b, n] = 0.5 * sum(p * (1 - p) ** (abs(n - i) - 1) for i in range(L) if i != n and not masked[b, i])
    return out


def small_model(seed=0) -> DreamModel:
    c = DreamConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=32, mask_token_id=11, pad_token_id=10,
                    bos_token_id=10, eos_token_id=10)
    return DreamModel(c).init_weights(seed).eval()


def test_cart_matches_direct_formula():
    masked = torch.rand(3, 17, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.allclose(cart_weights(masked, 0.1), cart_direct(masked, 0.1), atol=1e-6)
    assert torch.allclose(cart_weights(masked, 0.3), cart_direct(masked, 0.3), atol=1e-6)


def test_cart_hand_cases():
    p = 0.1
    one = torch.tensor([[False] + [True] * 40])  # a single clean neighbour on the left
    w = cart_weights(one, p)[0]
    assert w[1].item() == pytest.approx(p / 2)
    assert w[40].item() == pytest.approx(0.5 * p * (1 - p) ** 39) and w[40] < 0.01  # deep in a masked run
    lone = torch.zeros(1, 401, dtype=torch.bool)
    lone[0, 200] = True  # all-clean context
    assert cart_weights(lone, p)[0, 200].item() == pytest.approx(1.0, abs=1e-6)


def test_time_weights():
    t = torch.tensor([0.25, 0.5])
    masked = torch.ones(2, 3, dtype=torch.bool)
    assert torch.allclose(token_weights(DiffusionObjective("elbo"), t, masked)[:, 0], 1 / t)
    assert torch.allclose(token_weights(DiffusionObjective("linear"), t, masked)[:, 0], 1 - t)
    assert torch.equal(token_weights(DiffusionObjective("none"), t, masked), torch.ones(2, 3))
    with pytest.raises(DreamError, match="unknown weighting"):
        DiffusionObjective("cosine")


def test_masking_respects_maskable():
    x = (torch.arange(300) % 50 + 1).repeat(200, 1)
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, :4] = False  # position 0 and a "prompt"
    t = sample_times(200, 1e-3, torch.Generator().manual_seed(0))
    noisy, masked = mask_tokens(x, maskable, t, 99, torch.Generator().manual_seed(1))
    assert not masked[:, :4].any() and (noisy[masked] == 99).all() and torch.equal(noisy[~masked], x[~masked])
    rate = masked[:, 4:].float().mean(1)
    assert torch.corrcoef(torch.stack([rate, t]))[0, 1] > 0.98  # masking probability follows t
    assert t.min() >= 1e-3 and t.max() <= 1


def test_span_mask_is_one_run_of_round_t_n_maskable_positions():
    maskable = torch.zeros(300, 40, dtype=torch.bool)
    maskable[:, 7:] = True  # an SFT row: the prompt (and position 0) is never masked; 33 maskable positions
    t = sample_times(300, 1e-3, torch.Generator().manual_seed(0))
    masked = mask_span(maskable, t, torch.Generator().manual_seed(1))
    starts, ends = [], []
    for row, tr in zip(masked, t.tolist()):
        where = row.nonzero(as_tuple=True)[0].tolist()
        assert len(where) == min(33, max(1, round(tr * 33)))  # the same share as independent masking at t
        assert where == list(range(where[0], where[-1] + 1)) and where[0] >= 7  # one contiguous run, maskable only
        starts.append(where[0])
        ends.append(where[-1])
    assert min(starts) == 7 and max(ends) == 39  # the run reaches both ends of the maskable part
    assert len(set(starts)) > 20  # and its place varies
    assert not mask_span(torch.zeros(2, 5, dtype=torch.bool), torch.tensor([0.5, 1.0])).any()  # nothing maskable


def test_diffusion_loss_equals_hand_computation():
    model = small_model()
    x = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 1]])
    masked = torch.tensor([[False, True, False, True, True], [False, False, True, False, False]])
    t = torch.tensor([0.5, 0.2])
    for obj, weights in [(DiffusionObjective("elbo"), [2.0, 2.0, 2.0, 5.0]),
                         (DiffusionObjective("linear"), [0.5, 0.5, 0.5, 0.8])]:
        out = diffusion_loss(model, x, torch.ones_like(masked), obj, t, masked)
        noisy = torch.where(masked, torch.tensor(11), x)
        with torch.no_grad():
            logits = model(noisy)
        ces = [F.cross_entropy(logits[b, j - 1], x[b, j]).item() for b, j in [(0, 1), (0, 3), (0, 4), (1, 2)]]
        expected = sum(w * c for w, c in zip(weights, ces)) / 4
        assert out.loss.item() == pytest.approx(expected, rel=1e-5) and out.count == 4
    focal = diffusion_loss(model, x, torch.ones_like(masked), DiffusionObjective("none", focal_gamma=2.0), t, masked)
    expected = sum(0.25 * (1 - math.exp(-c)) ** 2 * c for c in ces) / 4
    assert focal.loss.item() == pytest.approx(expected, rel=1e-5)


def test_position_zero_never_trained():
    model = small_model()
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(DreamError, match="position 0"):
        diffusion_loss(model, x, torch.ones_like(x, dtype=torch.bool), DiffusionObjective(), torch.tensor([0.5]),
                       torch.tensor([[True, False, False]]))


def test_ar_loss_is_next_token_ce():
    model = small_model()
    model.causal = True
    x = torch.tensor([[1, 2, 3, 4]])
    targets = torch.tensor([[False, True, True, True]])
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits[0, :-1], x[0, 1:]).item()
    assert ar_loss(model, x, targets).loss.item() == pytest.approx(expected, rel=1e-5)


def exact_elbo(model, context, cont, eps=0.0):
    n, total = len(cont), 0.0
    x = torch.tensor(context + cont)
    for k in range(1, n + 1):
        beta = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)  # ∫ t^{k-1} (1-t)^{n-k} dt
        for subset in itertools.combinations(range(n), k):
            noisy = x.clone()
            pos = [len(context) + s for s in subset]
            noisy[pos] = model.config.mask_token_id
            with torch.no_grad():
                logp = torch.log_softmax(model(noisy[None])[0], -1)
            total += beta * sum(logp[p - 1, x[p]].item() for p in pos)
    return total


def test_mc_elbo_converges_to_exact_enumeration():
    model = small_model(3)
    context, cont = [1, 2], [3, 4, 5]
    exact = exact_elbo(model, context, cont)
    estimate = elbo_loglik(model, context, cont, mc_num=4096, batch_size=512, eps=1e-4)
    assert estimate == pytest.approx(exact, rel=0.02)
    assert elbo_loglik(model, context, cont, mc_num=16, seed=1) != elbo_loglik(model, context, cont, mc_num=16, seed=2)
