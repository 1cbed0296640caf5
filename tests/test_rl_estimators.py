"""The RL log-likelihood estimators against exact enumeration on a tiny vocabulary and length, plus GRPO's
advantages, k3 KL and clipped loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.rl import Estimator, EstimatorSettings, draw, group_advantages, grpo_loss, k3_kl, loglik
from dreamlm.sampling import shift_logits

MASK = 3  # vocabulary: real tokens 0, 1, 2 and the mask


def tiny(causal: bool = False, seed: int = 0) -> DreamModel:
    """A random 1-layer model over 4 ids whose predictions depend strongly on context (large init)."""
    config = DreamConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         max_window_layers=1, mask_token_id=MASK, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                         causal=causal, initializer_range=0.8)
    return DreamModel(config).init_weights(seed).eval()


def logp(model: DreamModel, x: list[int], masked: set[int], i: int) -> float:
    """log p(x_i | x with `masked` positions masked), by a plain full forward and the shift: the reference."""
    noisy = torch.tensor([[MASK if j in masked else t for j, t in enumerate(x)]])
    with torch.no_grad():
        logits = shift_logits(model(noisy))[0, i]
    return float(torch.log_softmax(logits.double(), -1)[x[i]])


def subsets(items: list[int]):
    for k in range(len(items) + 1):
        yield from (set(c) for c in itertools.combinations(items, k))


def replicate(x: list[int], prompt_len: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs = torch.tensor([x] * rows)
    prompt = torch.zeros(rows, len(x), dtype=torch.bool)
    prompt[:, :prompt_len] = True
    return xs, prompt, ~prompt


def mc(model, estimator, x, prompt_len, settings, rows=6000, seed=0):
    xs, prompt, generated = replicate(x, prompt_len, rows)
    noise = draw(estimator, generated, prompt, settings, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = loglik(model, xs, generated, noise, estimator)
    return out, noise


def assert_close_mc(samples: torch.Tensor, exact: float, sigmas: float = 4.5) -> None:
    samples = samples.double()
    err = float(samples.std()) / math.sqrt(len(samples))
    assert abs(float(samples.mean()) - exact) < sigmas * err + 1e-6, (float(samples.mean()), exact, err)


X = [1, 2, 0, 1, 2]  # prompt [1, 2] (position 0 never masked), completion [0, 1, 2]
P = 2


def test_one_step_matches_enumeration_over_prompt_masks():
    model = tiny()
    p = 0.4
    out, noise = mc(model, Estimator.ONE_STEP, X, P, EstimatorSettings(prompt_mask_p=p))
    completion = list(range(P, len(X)))
    for i in completion:
        exact = 0.0
        for S in subsets([1]):  # the maskable prompt positions (not position 0)
            prob = p ** len(S) * (1 - p) ** (1 - len(S))
            exact += prob * logp(model, X, S | set(completion), i)
        assert_close_mc(out.values[:, i], exact)
    # each row's value is exactly the log-probability under that row's own mask
    for r in range(5):
        masked = set(noise.masked[0, r].nonzero().flatten().tolist())
        assert masked >= set(completion) and 0 not in masked
        for i in completion:
            assert out.values[r, i].item() == pytest.approx(logp(model, X, masked, i), abs=1e-5)
    assert out.mask[0].tolist() == [False, False, True, True, True]


def test_coupled_scores_each_token_once_and_matches_enumeration():
    model = tiny(seed=1)
    out, noise = mc(model, Estimator.COUPLED, X, P, EstimatorSettings())
    # coverage: the two complementary copies score every completion token exactly once, the prompt never
    scored = noise.scored.sum(0)
    assert bool((scored[:, P:] == 1).all()) and bool((scored[:, :P] == 0).all())
    assert bool((noise.masked[0] & noise.masked[1]).sum() == 0)
    completion = list(range(P, len(X)))
    n = len(completion)
    for i in completion:
        others = [j for j in completion if j != i]
        exact = 0.0
        for O in subsets(others):  # token i is scored with the other tokens O masked, O ~ Bernoulli(s), s ~ 2s ds
            k = len(O)
            weight = 2 * math.factorial(k + 1) * math.factorial(n - 1 - k) / math.factorial(n + 1)
            exact += weight * logp(model, X, O | {i}, i)
        assert_close_mc(out.values[:, i], exact)


def test_elbo_matches_enumeration_and_is_sequence_level():
    model = tiny(seed=2)
    out, noise = mc(model, Estimator.ELBO, X, P, EstimatorSettings(elbo_pairs=2, eps=1e-4))
    assert out.values.shape == (6000, 1) and bool(out.mask.all())
    completion = list(range(P, len(X)))
    n = len(completion)
    exact = 0.0  # E_t E_m[1/t Σ_masked log p] = Σ_S (k-1)!(n-k)!/n! Σ_{i in S} log p(x_i | S masked)
    for S in subsets(completion):
        k = len(S)
        if k:
            weight = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
            exact += weight * sum(logp(model, X, S, i) for i in S)
    assert_close_mc(out.values[:, 0], exact / n)  # per token
    # antithetic pairs: within a pair the masks are complementary on the completion
    assert bool(((noise.masked[0] ^ noise.masked[1])[:, P:]).all())


def test_elbo_is_a_lower_bound_of_a_distribution():
    """Σ_y exp(ELBO(y)) <= 1 over every completion y (exact ELBO by enumeration, through the estimator's own
    per-mask scoring)."""
    model = tiny(seed=3)
    total = 0.0
    n = 2
    for y in itertools.product(range(4), repeat=n):
        x = [1, *y]
        elbo = 0.0
        for S in subsets([1, 2]):
            if S:
                k = len(S)
                elbo += math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n) * sum(
                    logp(model, x, S, i) for i in S)
        total += math.exp(elbo)
    assert 0.2 < total <= 1.0


def test_exact_ar_logprobs_sum_to_one_over_all_completions():
    model = tiny(causal=True, seed=4)
    rows = [[1, a, b] for a, b in itertools.product(range(4), repeat=2)]
    xs = torch.tensor(rows)
    prompt = torch.zeros(xs.shape, dtype=torch.bool)
    prompt[:, 0] = True
    noise = draw(Estimator.EXACT, ~prompt, prompt, EstimatorSettings(), torch.Generator())
    with torch.no_grad():
        out = loglik(model, xs, ~prompt, noise, Estimator.EXACT)
    assert float(out.values.sum(1).double().exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_estimators_refuse_the_wrong_model_kind():
    xs, prompt, generated = replicate(X, P, 2)
    noise = draw(Estimator.EXACT, generated, prompt, EstimatorSettings(), torch.Generator())
    with pytest.raises(DreamError, match="causal"):
        loglik(tiny(), xs, generated, noise, Estimator.EXACT)
    with pytest.raises(DreamError, match="unknown estimator"):
        Estimator.parse("d2")


def test_group_advantages_exact_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards)
    half = 0.5 / (0.5 + 1e-4)  # centred ±0.5, population std 0.5
    assert adv[0].tolist() == pytest.approx([half, -half, -half, half])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    std = math.sqrt(3 * 0.75 ** 2 + 2.25 ** 2) / 2  # population std of (0, 0, 0, 3)
    assert adv[2].tolist() == pytest.approx([-0.75 / (std + 1e-4)] * 3 + [2.25 / (std + 1e-4)])
    assert group_advantages(rewards, scale=False)[2].tolist() == pytest.approx([-0.75, -0.75, -0.75, 2.25])
    assert adv.sum(1).abs().max() < 1e-5


def test_k3_is_exactly_kl_in_expectation_over_the_policy():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())
    assert float((p * k3_kl(p.log(), q.log())).sum()) == pytest.approx(kl, abs=1e-12)
    assert bool((k3_kl(p.log(), q.log()) >= 0).all()) and float(k3_kl(p.log(), p.log()).abs().max()) == 0.0


def test_grpo_loss_gradient_and_clipping():
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    logp = old.clone().requires_grad_(True)
    parts = grpo_loss(logp, old, None, mask, adv, clip_eps=0.2, beta=0.0, denominator=2.0)
    assert float(parts.loss) == pytest.approx(-(1.0 - 2.0) / 2)
    parts.loss.backward()
    # d/dlogp of -ρA averaged over the sequence's units, divided by the denominator
    assert logp.grad[0].tolist() == pytest.approx([-1 / 2 / 2, -1 / 2 / 2, 0.0])
    assert logp.grad[1].tolist() == pytest.approx([2 / 3 / 2] * 3)
    # a ratio beyond 1 + ε with a positive advantage (or below 1 - ε with a negative one) gets no gradient
    far = torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]], requires_grad=True)
    parts = grpo_loss(far, old, None, mask, adv, clip_eps=0.2, beta=0.0, denominator=2.0)
    parts.loss.backward()
    assert float(far.grad.abs().max()) == 0.0 and parts.clipped_sum == pytest.approx(2.0)
    # the KL term pulls towards the reference
    pulled = torch.zeros(1, 2, requires_grad=True)
    parts = grpo_loss(pulled, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool),
                      torch.zeros(1), 0.2, 1.0, 1.0)
    parts.loss.backward()
    assert bool((pulled.grad < 0).all()) and parts.kl_sum == pytest.approx(math.e - 2)
