"""The step machine: total threshold decoding, no option dropped, uneven rows, EOS fill, validation, compile buckets,
and many requests per forward (a request gives the same tokens alone or in any mixed batch, joining or leaving)."""

from __future__ import annotations

import pytest
import torch

from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.sampling import Constraints, SamplerOptions, advance, diffusion_generate, plan, sample_tokens, shift_logits
from dreamlm.sampling import generate as generate_module
from dreamlm.sampling.options import Alg

from reference import counting_backend

P = torch.tensor([[11, 12, 13, 14]])


def masks_left(model, x):
    return int((x == model.config.mask_token_id).sum())


# ---- threshold decoding is total and honours steps ------------------------------------------------------------
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_threshold_without_blocks_fills_every_mask_within_steps(tiny_model, alg):
    out = diffusion_generate(tiny_model, P, max_new_tokens=16, steps=4, threshold=0.99, alg=alg,
                             return_dict_in_generate=True)
    assert masks_left(tiny_model, out.sequences) == 0 and out.forward_passes <= 4


def test_threshold_with_blocks_keeps_steps_as_the_bound(tiny_model):
    out = diffusion_generate(tiny_model, P, max_new_tokens=16, steps=4, block_length=8, threshold=0.99,
                             alg="entropy", return_dict_in_generate=True, output_history=True)
    assert masks_left(tiny_model, out.sequences) == 0 and out.forward_passes <= 4
    assert (out.history[0][0, 12:] == tiny_model.config.mask_token_id).all()  # block 2 waits for block 1
    with pytest.raises(DreamError, match=r"steps \(3\) must be a multiple of the number of blocks \(2\)"):
        diffusion_generate(tiny_model, P, max_new_tokens=16, steps=3, block_length=8, threshold=0.9, alg="entropy")


def _first_step_scores(model, prompt, n_new, alg):
    m = model.config.mask_token_id
    x = torch.cat([prompt, torch.full((1, n_new), m)], dim=1)
    with torch.no_grad():
        logits = shift_logits(model(x))[0, prompt.shape[1]:]
    confidence, _ = sample_tokens(logits, alg=Alg(alg))
    return confidence


def test_threshold_commits_by_the_chosen_algs_confidence(tiny_model):
    # threshold 1.0 commits one slot a step: the most confident by the alg asked for (before: always p(x0))
    firsts = {}
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        for seed_prompt in ([11, 12, 13, 14], [40, 2, 77, 9]):
            prompt = torch.tensor([seed_prompt])
            out = diffusion_generate(tiny_model, prompt, max_new_tokens=12, steps=12, threshold=1.0, alg=alg,
                                     return_dict_in_generate=True, output_history=True)
            committed = (out.history[0][0, 4:] != tiny_model.config.mask_token_id).nonzero().flatten().tolist()
            expected = int(_first_step_scores(tiny_model, prompt, 12, alg).argmax())
            assert committed == [expected]
            firsts.setdefault(tuple(seed_prompt), set()).add(expected)
    assert any(len(s) > 1 for s in firsts.values())  # the algs really disagree here, so the test can tell them apart


def test_entropy_threshold_is_on_the_exp_negative_entropy_scale(tiny_model):
    scale = _first_step_scores(tiny_model, P, 12, "entropy").exp()
    threshold = float(scale.sort(descending=True).values[3])  # four slots reach it
    out = diffusion_generate(tiny_model, P, max_new_tokens=12, steps=12, threshold=threshold, alg="entropy",
                             return_dict_in_generate=True, output_history=True)
    committed = (out.history[0][0, 4:] != tiny_model.config.mask_token_id).nonzero().flatten()
    assert sorted(committed.tolist()) == sorted((scale >= threshold).nonzero().flatten().tolist())
    assert len(committed) == 4


# ---- no option is dropped silently; bad input gets one clear error -------------------------------------------
def _hook_none(i, x, logits):
    return None


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=0.9, alg="origin"), "which alg='origin' does not have"),
    (dict(refresh_every=2), "refresh_every refreshes a key/value cache"),
    (dict(seed=1, generator=torch.Generator()), "give seed or generator, not both"),
    (dict(seed=2**70), r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(seed=True), "seed must be an integer"),
    (dict(generator="cpu"), "generator must be a torch.Generator"),
    (dict(stop_at_eos="yes"), "stop_at_eos must be True or False"),
    (dict(steps=True), "steps must be an integer >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1"),
    (dict(num_return_sequences=True), "num_return_sequences must be an integer >= 1"),
    (dict(num_return_sequences=1.5), "num_return_sequences must be an integer >= 1"),
    (dict(temperature=True), "temperature must be"),
    (dict(temperature=1e-300), "temperature must be 0 .argmax. or a finite number >= 1e-06"),  # overflowed: NaN
    (dict(alg_temp=5e-324), "alg_temp must be 0 or a finite number >= 1e-06"),
    (dict(constraints=Constraints(banned_token_ids=[10**6])), "banned_token_ids holds 1000000"),
    (dict(constraints=Constraints(banned_token_ids=[-1])), "banned_token_ids holds -1"),
    (dict(constraints=Constraints(pinned={6: 10**6})), "pinned position 6 holds 1000000"),
    (dict(constraints=Constraints(pinned={60: 3})), "pinned position 60 is outside the canvas"),
    (dict(generation_tokens_hook_func=_hook_none), "generation_tokens_hook_func must return the canvas"),
    (dict(generation_logits_hook_func=_hook_none), "generation_logits_hook_func must return the logits"),
    (dict(generation_tokens_hook_func=3), "generation_tokens_hook_func must be a function"),
    (dict(attention_mask=torch.tensor([[1, 2, 1, 1]])), "only 0 .padding. and 1"),
])
def test_bad_options_are_refused_in_one_line(tiny_model, kwargs, message):
    kw = {"max_new_tokens": 8, "steps": 8, "alg": "entropy", **kwargs}
    with pytest.raises(DreamError, match=message) as info:
        diffusion_generate(tiny_model, P, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("prompt", [[[3, -1, 5]], [[3, 10**6, 5]]])
def test_prompt_ids_outside_the_vocabulary_are_refused(tiny_model, prompt):
    with pytest.raises(DreamError, match="input_ids holds .* not a token id of this model"):
        diffusion_generate(tiny_model, torch.tensor(prompt), max_new_tokens=4, steps=4)


def test_generator_on_another_device_is_refused():
    with pytest.raises(DreamError, match="the generator is on cpu but the model on cuda:0"):
        generate_module._generator(torch.device("cuda", 0), torch.Generator(), None)


def test_model_refuses_an_input_longer_than_its_context(tiny_model):
    n = tiny_model.config.context_length + 1
    with pytest.raises(DreamError, match=f"the input has {n} tokens, more than the model's context"):
        tiny_model(torch.zeros(1, n, dtype=torch.long))


# ---- uneven rows (batched infilling) all finish; committed tokens are never overwritten ----------------------
@pytest.mark.parametrize("settings", [dict(alg="entropy"), dict(alg="maskgit_plus"), dict(alg="topk_margin"),
                                      dict(alg="origin", temperature=0.8), dict(alg="entropy", alg_temp=0.5)])
def test_rows_with_different_mask_counts_all_finish(tiny_model, settings):
    m = tiny_model.config.mask_token_id
    canvas = torch.tensor([[3, m, m, 5, 6, 7, 8, 9, 10, 11],
                           [3, m, m, m, m, m, m, m, m, 11]])
    x = diffusion_generate(tiny_model, canvas, max_length=10, steps=3, seed=0, **settings)
    assert masks_left(tiny_model, x) == 0
    assert torch.equal(x[0, 3:], canvas[0, 3:]) and x[0, 0] == 3 and x[1, -1] == 11  # context untouched
    if settings.get("temperature", 0) == 0 and not settings.get("alg_temp"):
        for row in range(2):  # each row decodes on its own schedule: the same tokens as alone
            alone = diffusion_generate(tiny_model, canvas[row:row + 1], max_length=10, steps=3, **settings)
            assert torch.equal(x[row], alone[0])


# ---- stop_at_eos: everything after the first EOS is EOS ------------------------------------------------------
@pytest.mark.parametrize("options", [dict(threshold=1e-6), dict(block_length=16, threshold=1e-6)])
def test_stop_at_eos_fills_everything_after_the_first_eos(tiny_model, options):
    eos = tiny_model.config.eos_token_id

    def eos_at_eight(i, x, logits):
        logits[:, 8, eos] += 50.0  # the model is sure the text ends at position 8
        return logits

    kw = dict(max_new_tokens=16, steps=16, alg="entropy", generation_logits_hook_func=eos_at_eight,
              return_dict_in_generate=True, **options)
    free = diffusion_generate(tiny_model, P, **kw).sequences
    assert free[0, 8] == eos and (free[0, 9:] != eos).any()  # without stop_at_eos: text after the EOS
    out = diffusion_generate(tiny_model, P, stop_at_eos=True, **kw)
    assert torch.equal(out.sequences[0, :9], free[0, :9]) and (out.sequences[0, 9:] == eos).all()


def test_stop_at_eos_keeps_pinned_tokens_and_counts_a_pinned_eos(tiny_model):
    eos = tiny_model.config.eos_token_id
    pins = Constraints(pinned={6: eos, 7: 99})
    out = diffusion_generate(tiny_model, P, max_new_tokens=12, steps=12, alg="entropy", stop_at_eos=True,
                             constraints=pins, block_length=4, return_dict_in_generate=True)
    assert out.sequences[0, 6] == eos and out.sequences[0, 7] == 99 and (out.sequences[0, 8:] == eos).all()
    assert out.forward_passes == 4  # the first block's 4 steps fill slots 4 and 5; the pinned EOS ends the text


# ---- compile: a few bucketed graphs serve every request; never a silent eager fallback ------------------------
def test_compile_buckets_canvas_lengths(tiny_model):
    # canvases of 10, 30 and 50 tokens share one 64-token graph (left-padded, the pads masked out); 70 takes the 128
    # one. Padding changes only float rounding: the same logits to 1e-5 at every step, the same greedy tokens
    torch._dynamo.reset()
    backend, graphs = counting_backend()

    def run(n_new, **compile_kw):
        seen = []
        x = diffusion_generate(tiny_model, P, max_new_tokens=n_new, steps=4, alg="maskgit_plus",
                               generation_logits_hook_func=lambda i, x, logits: seen.append(logits) or logits,
                               **compile_kw)
        return x, seen

    for n_new in (6, 26, 46):
        (eager, eager_logits), (fast, fast_logits) = run(n_new), run(n_new, compile=backend)
        assert torch.equal(eager, fast)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager_logits, fast_logits))
    assert len(graphs) == 1
    run(66, compile=backend)
    assert len(graphs) == 2


def test_compile_past_the_graph_limit_is_an_error_not_a_fallback(tiny_model, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(generate_module, "COMPILE_GRAPHS", 1)
    backend, graphs = counting_backend()
    diffusion_generate(tiny_model, P, max_new_tokens=6, steps=2, alg="entropy", compile=backend)
    with pytest.raises(DreamError, match="compile: more than 1 distinct shapes"):
        diffusion_generate(tiny_model, P, max_new_tokens=66, steps=2, alg="entropy", compile=backend)
    torch._dynamo.reset()


# ---- many requests per forward -------------------------------------------------------------------------------
REQUESTS = [
    dict(prompt=[[11, 12, 13, 14]], new=12, options=dict(steps=12, alg="entropy")),
    dict(prompt=[[40, 41]], new=7, options=dict(steps=7, alg="origin", temperature=0.9), seed=3),
    dict(prompt=[[5, 6, 7, 8, 9, 10]], new=10, options=dict(steps=5, alg="maskgit_plus", temperature=0.5,
                                                            top_p=0.9), seed=4),
    dict(prompt=[[21, 22, 23]], new=12, options=dict(steps=6, alg="topk_margin", block_length=4)),
    dict(prompt=[[30, 31, 32]], new=12, options=dict(steps=12, alg="entropy", threshold=0.3, stop_at_eos=True)),
    dict(prompt=[[50, 51, 52, 53]], new=8, options=dict(steps=8, alg="entropy", temperature=1.0, alg_temp=0.4),
         seed=5),
    dict(prompt=[[60, 61], [62, 63]], new=6, options=dict(steps=3, alg="entropy", temperature=0.7), seed=6),
    dict(prompt=[[70, 71, 72]], new=12, options=dict(steps=6, alg="entropy", block_length=4, cache="dual",
                                                     threshold=0.2)),
    dict(prompt=[[80, 81, 82]], new=12, options=dict(steps=12, alg="maskgit_plus", block_length=6, cache="prefix",
                                                     refresh_every=2)),
]


def _state(model, request, **extra):
    return plan(model, torch.tensor(request["prompt"]), max_new_tokens=request["new"],
                options=SamplerOptions(**request["options"]), seed=request.get("seed", 0), **extra)


def _alone(model, request):
    state = _state(model, request)
    while not state.done:
        advance(model, [state])
    return state.x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_returns_what_each_request_returns_alone(tiny_dir, dtype):
    model = DreamModel.from_pretrained(tiny_dir, dtype=dtype)
    alone = [_alone(model, r) for r in REQUESTS]
    states = [_state(model, r) for r in REQUESTS]
    packed, steps = [], 0
    real = model.packed_forward
    model.packed_forward = lambda canvases, select=None: packed.append(len(canvases)) or real(canvases, select)
    try:
        while not all(s.done for s in states):
            advance(model, states)
            steps += 1
    finally:
        del model.packed_forward
    for request, state, expected in zip(REQUESTS, states, alone):
        assert torch.equal(state.x, expected), request
    # every step ran ONE packed forward for all the cacheless requests, whatever their canvas lengths
    assert len(packed) == steps and max(packed) >= 5
    assert len({r["prompt"][0].__len__() + r["new"] for r in REQUESTS}) > 3  # the canvases really differ in length


def test_packed_forward_gives_each_canvas_its_logits_alone(tiny_dir):
    from dreamlm.model import padding_attention, padding_positions

    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    for causal in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            model = DreamModel.from_pretrained(tiny_dir, dtype=dtype, causal=causal)
            gen = torch.Generator().manual_seed(0)
            canvases = [(torch.randint(0, 200, (1, 17), generator=gen), None, None),
                        (torch.randint(0, 200, (2, 10), generator=gen), padding_attention(pad, causal),
                         padding_positions(pad)),
                        (torch.randint(0, 200, (1, 33), generator=gen), None, None),
                        (torch.randint(0, 200, (3, 17), generator=gen), None, None)]
            with torch.no_grad():
                out = model.packed_forward(canvases)
                offset = 0
                for x, mask, positions in canvases:
                    own = out[offset:offset + x.numel()].view(*x.shape, -1)
                    assert torch.equal(own, model(x, mask, positions)), (causal, dtype, x.shape)
                    offset += x.numel()
                rows = torch.tensor([3, 20, 40, 77, 120])
                assert torch.equal(model.packed_forward(canvases, select=rows), out[rows])


def test_diffusion_generate_equals_a_single_state(tiny_model):
    for request in REQUESTS:
        seed = request.get("seed", 0)
        x = diffusion_generate(tiny_model, torch.tensor(request["prompt"]), max_new_tokens=request["new"],
                               seed=seed, **request["options"])
        assert torch.equal(x, _alone(tiny_model, request))


def test_joining_and_leaving_mid_flight_changes_no_other_request(tiny_model):
    alone = [_alone(tiny_model, r) for r in REQUESTS]
    live = [_state(tiny_model, r) for r in REQUESTS[:3]]
    waiting = [(i, _state(tiny_model, r)) for i, r in enumerate(REQUESTS) if i >= 3]
    cancelled = _state(tiny_model, dict(prompt=[[90, 91]], new=20, options=dict(steps=20, alg="entropy")))
    live.append(cancelled)
    joined = {0: live[0], 1: live[1], 2: live[2]}
    step = 0
    while any(not s.done for s in live) or waiting:
        if waiting and step % 2 == 1:  # a new request joins every other step
            i, state = waiting.pop(0)
            joined[i] = state
            live.append(state)
        if step == 3:
            live.remove(cancelled)  # a client went away: its state leaves
        advance(tiny_model, live)
        live = [s for s in live if not s.done]
        step += 1
    for i, state in joined.items():
        assert torch.equal(state.x, alone[i]), REQUESTS[i]
    assert not cancelled.done


def test_left_padded_request_in_a_mixed_batch(tiny_model):
    pad = tiny_model.config.pad_token_id
    prompt = torch.tensor([[pad, pad, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    options = SamplerOptions(steps=6, alg="entropy", temperature=0.6)
    ref = plan(tiny_model, prompt, mask, max_new_tokens=6, options=options, seed=9)
    while not ref.done:
        advance(tiny_model, [ref])
    mixed = [plan(tiny_model, prompt, mask, max_new_tokens=6, options=options, seed=9), _state(tiny_model, REQUESTS[0])]
    while not all(s.done for s in mixed):
        advance(tiny_model, mixed)
    assert torch.equal(mixed[0].x, ref.x)


# ---- the CLI never prints a literal mask ------------------------------------------------------------------------
def test_cli_generate_bans_the_mask_id(monkeypatch):
    from typer.testing import CliRunner

    import dreamlm.sampling as sampling
    from dreamlm.cli import app

    seen = {}
    real = sampling.plan  # the CLI steps the machine itself (plan + advance) unless --show

    def spy(model, *args, **kwargs):
        seen["banned"] = set(kwargs["constraints"].banned_token_ids)
        seen["mask"] = model.config.mask_token_id
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sampling, "plan", spy)
    res = CliRunner().invoke(app, ["generate", "Hello", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert seen["mask"] in seen["banned"] and "<|mask|>" not in res.stdout


def test_steps_for_blocks_rounds_up_to_a_multiple_of_the_blocks():
    from dreamlm.sampling import steps_for_blocks

    assert steps_for_blocks(19, 20, None) == 19
    assert steps_for_blocks(19, 20, 10) == 20  # 2 blocks
    assert steps_for_blocks(19, 21, 10) == 21  # 3 blocks
    assert steps_for_blocks(4, 40, 8) == 5     # never below the number of blocks


def test_infill_canvases_of_different_lengths_batch_exactly():
    # the evaluation harness found left-padded batches of these canvases changing 2 of 4 rows; packed forwards give
    # each canvas its own attention, so canvases of any lengths batch exactly
    import json
    import random
    from importlib import resources

    from dreamlm.model import DreamModel
    from dreamlm.sampling import parse_template

    root = resources.files("dreamlm")
    model = DreamModel.from_pretrained(str(root / "assets" / "tiny-dream"), dtype=torch.float32)
    tok, mask = model.tokenizer, model.config.mask_token_id
    lines = (root / "eval" / "tasks" / "data" / "code_infill.jsonl").read_text().splitlines()[:4]
    docs = [json.loads(line) for line in lines]
    canvases = [parse_template(tok, d["prefix"] + f"<|mask:{d['tokens']}|>" + d["suffix"], mask,
                               model.config.bos_token_id).ids for d in docs]
    rng = random.Random(0)
    canvases += [[x if x == mask or i == 0 else rng.randrange(400) for i, x in enumerate(c)] for c in canvases]

    def run(group):
        states = [plan(model, torch.tensor([c]), max_length=len(c), seed=0,
                      options=SamplerOptions(steps=sum(x == mask for x in c), alg="entropy")) for c in group]
        with torch.no_grad():
            while not all(s.done for s in states):
                advance(model, states)
        return [s.x[0].tolist() for s in states]

    assert run(canvases) == [run([c])[0] for c in canvases]
