"""Fast decoding options of the one loop: off == vanilla; cache with refresh == no cache; threshold; blocks;
early stop never changes the text; batch == single; the KV cache itself; AR decoding with a cache."""

from __future__ import annotations

import pytest
import torch

from dreamlm.errors import DreamError
from dreamlm.model import KVCache
from dreamlm.sampling import Constraints, cut_at_eos, diffusion_generate
from dreamlm.sampling.autoregressive import ar_generate
from reference import counting_backend, spec_reference

P = torch.tensor([[11, 12, 13, 14]])


@pytest.mark.parametrize("settings", [dict(alg="origin", temperature=0.5), dict(alg="maskgit_plus"),
                                      dict(alg="entropy", temperature=0.5, top_p=0.9)])
def test_all_options_off_is_dreams_sampler(tiny_model, settings):
    # every fast option given explicitly and off: token for token the literal reading of the spec
    torch.manual_seed(99)
    expected = spec_reference(tiny_model, P, 12, 6, **settings)
    torch.manual_seed(99)
    got = diffusion_generate(tiny_model, P, max_new_tokens=12, steps=6, block_length=None, cache="none",
                             refresh_every=None, threshold=None, stop_at_eos=False, compile=False, **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_cache_is_exact_for_a_causal_model(tiny_model, cache, alg):
    # with causal attention a block's slots never see later positions, and the cached prefix never changes inside a
    # block: the cache (reused for every step after the block's first) must give exactly the no-cache tokens
    kw = dict(max_new_tokens=16, steps=8, block_length=4, alg=alg, temperature=0.4, seed=2,
              return_dict_in_generate=True)
    tiny_model.causal = True
    try:
        plain = diffusion_generate(tiny_model, P, **kw)
        cached = diffusion_generate(tiny_model, P, cache=cache, **kw)
        refreshed = diffusion_generate(tiny_model, P, cache=cache, refresh_every=1, **kw)
    finally:
        tiny_model.causal = False
    assert torch.equal(plain.sequences, cached.sequences) and torch.equal(plain.sequences, refreshed.sequences)
    assert cached.forward_passes == plain.forward_passes == 8


def test_span_forward_matches_full_forward(tiny_model):
    x = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    kv = KVCache(len(tiny_model.model.layers))
    with torch.no_grad():
        full = tiny_model(x, cache=kv)
        prefix = tiny_model(x[:, 7:], cache=kv, start=7)
        dual = tiny_model(x[:, 7:12], cache=kv, start=7)
    assert torch.allclose(prefix, full[:, 7:], atol=1e-5) and torch.allclose(dual, full[:, 7:12], atol=1e-5)


def _commits(out, mask_id):
    masks = [int((h == mask_id).sum()) for h in out.history]
    return [a - b for a, b in zip(masks, masks[1:])]


def test_threshold_one_commits_one_token_per_step(tiny_model):
    out = diffusion_generate(tiny_model, P, max_new_tokens=10, steps=10, alg="entropy", threshold=1.0,
                             return_dict_in_generate=True, output_history=True)
    m = tiny_model.config.mask_token_id
    assert int((out.history[0] == m).sum()) == 9 and _commits(out, m) == [1] * 9
    assert out.forward_passes == 10 and not (out.sequences == m).any()


def test_low_threshold_commits_many_per_step(tiny_model):
    out = diffusion_generate(tiny_model, P, max_new_tokens=16, steps=16, alg="entropy", threshold=1e-6,
                             block_length=8, cache="dual", return_dict_in_generate=True)
    assert out.forward_passes == 2  # one pass fills each block
    assert not (out.sequences == tiny_model.config.mask_token_id).any()


def test_blocks_fill_left_to_right(tiny_model):
    m = tiny_model.config.mask_token_id
    out = diffusion_generate(tiny_model, P, max_new_tokens=12, steps=6, alg="maskgit_plus", block_length=4,
                             cache="prefix", return_dict_in_generate=True, output_history=True)
    for h in out.history[:2]:  # the first block's two steps never touch later blocks
        assert (h[0, 8:] == m).all()
    assert not (out.history[1][0, 4:8] == m).any() and out.forward_passes == 6


@pytest.mark.parametrize("options", [dict(), dict(alg="origin", temperature=0.5, seed=0), dict(block_length=4),
                                     dict(block_length=4, cache="dual"), dict(block_length=4, cache="prefix"),
                                     dict(threshold=0.5), dict(block_length=4, cache="prefix", threshold=0.3)])
def test_early_stop_saves_passes_and_never_changes_the_text(tiny_model, options):
    # the text must end at position 6 (an EOS pinned there): once slots 4 and 5 are filled, every mode stops early
    eos = tiny_model.config.eos_token_id
    # (origin commits at random: with seed 0 slots 4 and 5 are drawn by step 10 of 16)
    kw = {"max_new_tokens": 16, "steps": 16, "alg": "entropy", "seed": 4, "return_dict_in_generate": True,
          "constraints": Constraints(pinned={6: eos}), **options}
    full = diffusion_generate(tiny_model, P, **kw)
    early = diffusion_generate(tiny_model, P, stop_at_eos=True, **kw)
    assert cut_at_eos(full.sequences[0].tolist(), eos, 4) == cut_at_eos(early.sequences[0].tolist(), eos, 4)
    assert (early.sequences[0, 6:] == eos).all()
    assert early.forward_passes < full.forward_passes


@pytest.mark.parametrize("options", [dict(block_length=4, cache="dual"), dict(block_length=4, cache="prefix",
                                                                               threshold=0.2)])
def test_batch_equals_single_with_fast_options(tiny_model, options):
    pad = tiny_model.config.pad_token_id
    a, b = [7, 8, 9, 10, 11, 12], [20, 21, 22]
    batch = torch.tensor([a, [pad] * 3 + b])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    kw = dict(max_new_tokens=8, steps=8, alg="entropy", **options)
    together = diffusion_generate(tiny_model, batch, mask, **kw)
    alone_a = diffusion_generate(tiny_model, torch.tensor([a]), **kw)
    assert torch.equal(together[0], alone_a[0])
    if "threshold" not in options:  # with a threshold, rows may need different numbers of steps
        alone_b = diffusion_generate(tiny_model, torch.tensor([b]), **kw)
        assert torch.equal(together[1, 3:], alone_b[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_length=5, steps=7), "multiple of the number of blocks"),
    (dict(cache="paged"), "unknown cache 'paged'"),
    (dict(threshold=0.0), "threshold must be in"),
    (dict(block_length=0), "block_length must be"),
    (dict(cache="dual", generation_logits_hook_func=lambda i, x, l: l), "logits hook"),
    (dict(cache="dual", block_length=5, compile="eager"), "compile runs static full-canvas forwards"),
    (dict(compile=3), "compile must be True"),
])
def test_fast_option_errors(tiny_model, kwargs, message):
    with pytest.raises(DreamError, match=message):
        diffusion_generate(tiny_model, P, max_new_tokens=10, **{"steps": 10, **kwargs})


def test_ar_generate_with_cache_equals_without(tiny_model):
    tiny_model.causal = True
    try:
        a, passes_a = ar_generate(tiny_model, P, 10, use_cache=True, stop_at_eos=False)
        b, passes_b = ar_generate(tiny_model, P, 10, use_cache=False, stop_at_eos=False)
    finally:
        tiny_model.causal = False
    assert torch.equal(a, b) and passes_a == passes_b == 10
    with pytest.raises(DreamError, match="bidirectional"):
        ar_generate(tiny_model, P, 4)


@pytest.mark.parametrize("options", [
    dict(),
    dict(threshold=0.5, block_length=4, stop_at_eos=True),
])
def test_compile_is_static_and_token_identical(tiny_model, options):
    # A counting torch.compile backend: every forward of the loop goes through one captured graph (no graph
    # break, no recompilation across steps or calls of the same shape) and the tokens equal the eager loop's.
    torch._dynamo.reset()
    backend, graphs = counting_backend()
    kw = dict(max_new_tokens=12, steps=12, alg="entropy", temperature=0.4, seed=5, **options)
    for prompt in (P, torch.tensor([[21, 22, 23, 24]])):
        eager = diffusion_generate(tiny_model, prompt, **kw)
        compiled = diffusion_generate(tiny_model, prompt, compile=backend, **kw)
        assert torch.equal(eager, compiled)
    assert len(graphs) == 1
    padded = torch.tensor([[0, 11, 12, 13], [11, 12, 13, 14]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    eager = diffusion_generate(tiny_model, padded, attention_mask=mask, **kw)
    assert torch.equal(eager, diffusion_generate(tiny_model, padded, attention_mask=mask, compile=backend, **kw))
    assert len(graphs) == 2  # a new shape (batch 2, with a padding mask) compiles once more
