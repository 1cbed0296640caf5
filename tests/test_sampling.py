"""diffusion_generate: Dream's semantics (spec §2), checked against a literal per-row reading of the spec."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreamlm.errors import DreamError
from dreamlm.sampling import Constraints, diffusion_generate, shift_logits
from reference import spec_reference


SETTINGS = [
    dict(alg="origin"),
    dict(alg="origin", temperature=0.7, top_p=0.9),
    dict(alg="maskgit_plus"),
    dict(alg="maskgit_plus", temperature=0.5, top_k=20),
    dict(alg="topk_margin"),
    dict(alg="entropy"),
    dict(alg="entropy", temperature=0.2, top_p=0.95),
    dict(alg="entropy", temperature=1.0, alg_temp=0.5),
    dict(alg="maskgit_plus", alg_temp=0.3),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_matches_literal_spec_token_for_token(tiny_model, settings):
    prompt = torch.tensor([[5, 17, 33, 60, 2], [9, 9, 41, 7, 100]])
    torch.manual_seed(1234)
    expected = spec_reference(tiny_model, prompt, 12, 7, **settings)
    torch.manual_seed(1234)
    got = diffusion_generate(tiny_model, prompt, max_new_tokens=12, steps=7, **settings)
    assert torch.equal(got, expected)


def _commits(model, n_new, steps, alg="entropy"):
    out = diffusion_generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=n_new, steps=steps, alg=alg,
                             return_dict_in_generate=True, output_history=True)
    masks = [n_new] + [int((h == model.config.mask_token_id).sum()) for h in out.history]
    return [a - b for a, b in zip(masks, masks[1:])]


def test_worked_counts_steps_equal_tokens(tiny_model):
    assert _commits(tiny_model, 16, 16) == [0] + [1] * 14 + [2]


def test_worked_counts_512_tokens_128_steps(long_model):
    counts = _commits(long_model, 512, 128)
    assert counts[0] == 3 and counts[-1] == 5 and set(counts[1:-1]) <= {3, 4} and sum(counts) == 512
    assert counts[1:-1].count(4) > 100  # "3, then 4 per step, then 5"


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_prompt_never_changes_and_all_masks_filled(tiny_model, alg):
    prompt = torch.tensor([[11, 12, 13, 14, 15, 16]])
    x = diffusion_generate(tiny_model, prompt, max_new_tokens=10, steps=4, alg=alg, temperature=0.9, seed=0)
    assert torch.equal(x[:, :6], prompt)
    assert not (x == tiny_model.config.mask_token_id).any()


def test_steps_one_fills_everything_in_one_pass(tiny_model):
    calls = []
    hook = lambda i, x, logits: (calls.append(i), logits)[1]  # noqa: E731
    x = diffusion_generate(tiny_model, torch.tensor([[4, 5]]), max_new_tokens=9, steps=1, alg="entropy",
                           generation_logits_hook_func=hook)
    assert calls == [0] and not (x == tiny_model.config.mask_token_id).any()


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_left_padded_batch_rows_equal_single_runs(tiny_model, alg):
    pad = tiny_model.config.pad_token_id
    a, b = [7, 8, 9, 10, 11, 12], [20, 21, 22]
    batch = torch.tensor([a, [pad] * 3 + b])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    together = diffusion_generate(tiny_model, batch, mask, max_new_tokens=8, steps=8, alg=alg)
    alone_a = diffusion_generate(tiny_model, torch.tensor([a]), max_new_tokens=8, steps=8, alg=alg)
    alone_b = diffusion_generate(tiny_model, torch.tensor([b]), max_new_tokens=8, steps=8, alg=alg)
    assert torch.equal(together[0], alone_a[0])
    assert torch.equal(together[1, 3:], alone_b[0])


def test_hooks_calls_and_arguments(tiny_model):
    tokens_calls, logits_calls = [], []

    def tokens_hook(i, x, logits):
        tokens_calls.append((i, x.clone(), None if logits is None else logits.shape))
        return x

    def logits_hook(i, x, logits):
        with torch.no_grad():
            expected = shift_logits(tiny_model(x))
        assert torch.allclose(logits, expected, atol=1e-6)  # the hook sees the shifted logits of the current canvas
        logits_calls.append(i)
        return logits

    diffusion_generate(tiny_model, torch.tensor([[3, 4, 5]]), max_new_tokens=6, steps=5, alg="maskgit_plus",
                       generation_tokens_hook_func=tokens_hook, generation_logits_hook_func=logits_hook)
    assert [c[0] for c in tokens_calls] == [None, 0, 1, 2, 3, 4]
    assert tokens_calls[0][2] is None and (tokens_calls[0][1][0, 3:] == tiny_model.config.mask_token_id).all()
    assert tokens_calls[1][2] == (1, 9, tiny_model.config.vocab_size)
    assert logits_calls == [0, 1, 2, 3, 4]


def test_tokens_hook_can_pin_an_ending(tiny_model):
    end = torch.tensor([44, 45])

    def pin(i, x, logits):
        x[:, -2:] = end
        return x

    x = diffusion_generate(tiny_model, torch.tensor([[3, 4]]), max_new_tokens=8, steps=8, alg="origin",
                           temperature=0.6, seed=3, generation_tokens_hook_func=pin)
    assert torch.equal(x[0, -2:], end)


def test_history_and_dict_output(tiny_model):
    out = diffusion_generate(tiny_model, torch.tensor([[3, 4]]), max_new_tokens=5, steps=5, alg="entropy",
                             return_dict_in_generate=True, output_history=True)
    assert len(out.history) == 5 and torch.equal(out.history[-1], out.sequences)
    plain = diffusion_generate(tiny_model, torch.tensor([[3, 4]]), max_new_tokens=5, steps=5, alg="entropy",
                               return_dict_in_generate=True)
    assert plain.history is None and torch.equal(plain.sequences, out.sequences)


def test_seed_reproducible_and_generator(tiny_model):
    kw = dict(max_new_tokens=12, steps=6, alg="origin", temperature=1.0)
    p = torch.tensor([[3, 4]])
    a = diffusion_generate(tiny_model, p, seed=7, **kw)
    b = diffusion_generate(tiny_model, p, seed=7, **kw)
    c = diffusion_generate(tiny_model, p, seed=8, **kw)
    d = diffusion_generate(tiny_model, p, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_num_return_sequences_and_lengths(tiny_model):
    x = diffusion_generate(tiny_model, torch.tensor([[3, 4], [5, 6]]), max_new_tokens=4, steps=2,
                           num_return_sequences=3, alg="origin", temperature=1.0, seed=0)
    assert x.shape == (6, 6) and torch.equal(x[:3, :2], torch.tensor([[3, 4]] * 3))
    assert diffusion_generate(tiny_model, torch.tensor([[3, 4]]), max_length=10, steps=2).shape == (1, 10)
    assert diffusion_generate(tiny_model, torch.tensor([[3, 4]]), steps=2).shape == (1, 22)  # 20 + prompt


def test_constraints_ban_and_pin(tiny_model):
    p = torch.tensor([[3, 4]])
    free = diffusion_generate(tiny_model, p, max_new_tokens=16, steps=16, alg="entropy")
    banned = sorted(set(free[0, 2:].tolist()))
    x = diffusion_generate(tiny_model, p, max_new_tokens=16, steps=16, alg="entropy",
                           constraints=Constraints(pinned={5: 77}, banned_token_ids=banned))
    assert x[0, 5] == 77
    assert not any(t in banned for t in x[0, 2:].tolist() if t != 77)


def test_masks_inside_the_prompt_are_generated(tiny_model):
    m = tiny_model.config.mask_token_id
    x = diffusion_generate(tiny_model, torch.tensor([[3, m, 5]]), max_new_tokens=2, steps=3, alg="entropy")
    assert not (x == m).any() and x[0, 0] == 3 and x[0, 2] == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(alg="nope"), "unknown alg 'nope'"),
    (dict(steps=0), "steps must be"),
    (dict(eps=0.0), "eps must be in"),
    (dict(eps=1.0), "eps must be in"),
    (dict(temperature=-0.1), "temperature must be"),
    (dict(temperature=math.nan), "temperature must be"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=0), "top_k must be"),
    (dict(max_length=2), "leaves no room"),
    (dict(max_new_tokens=10_000), "more than the model's context"),
])
def test_bad_arguments(tiny_model, kwargs, message):
    with pytest.raises(DreamError, match=message):
        diffusion_generate(tiny_model, torch.tensor([[3, 4]]), **{"max_new_tokens": 4, **kwargs}
                           if "max_length" not in kwargs else kwargs)


def test_first_token_mask_and_empty_prompt_refused(tiny_model):
    m = tiny_model.config.mask_token_id
    with pytest.raises(DreamError, match="first token of a sequence must not be a mask"):
        diffusion_generate(tiny_model, torch.tensor([[m, 4]]), max_new_tokens=3)
    with pytest.raises(DreamError, match="prompt is empty"):
        diffusion_generate(tiny_model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
