"""DreamOn's length states: the training augmentation, the expand/delete transitions of the step machine, infilling
with automatic length, and old checkpoints refusing it."""

from __future__ import annotations

import json

import pytest
import torch

from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.sampling import SamplerOptions, advance, diffusion_generate, plan
from dreamlm.training.objective import LengthStates, augment_lengths, fit_length, restore_lengths

MASK, EXPAND, DELETE = 10, 11, 12


# ---- the training augmentation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_augmentation_lengths_and_inverse(seed):
    states = LengthStates(MASK, EXPAND, DELETE, max_delete=6, max_middle=12)
    gen = torch.Generator().manual_seed(seed)
    x = list(range(100, 130))
    maskable = [False, False] + [True] * 25 + [False] * 3  # a clean prefix token pair and a clean suffix
    t = float(torch.rand(1, generator=gen))
    aug = augment_lengths(x, maskable, t, states, gen)
    merged = sum(g - 1 for g in aug.sizes if g > 1)
    deletes = aug.sizes.count(0)
    assert len(aug.z) == len(x) - merged + deletes == len(aug.masked) == len(aug.sizes)
    assert sum(aug.sizes) == len(x)
    # an expand stands for >= 2 tokens, a delete for none, every other token for itself; both are always masked
    for token, size, masked in zip(aug.z, aug.sizes, aug.masked):
        assert (token == EXPAND) == (size >= 2)
        assert (token == DELETE) == (size == 0)
        if token in (EXPAND, DELETE):
            assert masked
    # nothing outside the maskable region changes or is masked; deletes follow the middle in one run
    assert aug.z[:2] == x[:2] and aug.z[-3:] == x[-3:] and not any(aug.masked[:2] + aug.masked[-3:])
    where = [i for i, s in enumerate(aug.sizes) if s == 0]
    assert where == list(range(where[0], where[0] + len(where))) if where else True
    assert restore_lengths(aug, x, states) == x  # collapsing expands and dropping deletes gives the original


def test_augmentation_really_merges_and_deletes():
    states = LengthStates(MASK, EXPAND, DELETE, max_delete=4, max_middle=20, merge_p=0.9, static_share=1.0)
    seen_expand = seen_delete = False
    for seed in range(20):
        aug = augment_lengths(list(range(100, 124)), [False] + [True] * 23, 0.9, states,
                              torch.Generator().manual_seed(seed))
        seen_expand |= EXPAND in aug.z
        seen_delete |= DELETE in aug.z
    assert seen_expand and seen_delete


def test_fit_length_cuts_or_pads_the_tail():
    states = LengthStates(MASK, EXPAND, DELETE)
    x = list(range(100, 110))
    aug = augment_lengths(x, [False] + [True] * 9, 0.5, states, torch.Generator().manual_seed(3))
    z, masked = fit_length(aug, 12, pad_id=0)
    assert z.tolist()[: min(12, len(aug.z))] == aug.z[:12] and len(z) == 12
    assert not masked[len(aug.z):].any()


# ---- the transitions: a scripted model -------------------------------------------------------------------------
class Script:
    """Logits that ask each gap for `target`: slot j of a gap says target[j]; the gap's last slot says <|expand|>
    while the gap is shorter than the target, and a slot past the target's end says <|delete|>. The leftmost slot
    is the most confident, so one commit per step gives a canvas sequence that can be written down by hand."""

    def __init__(self, model: DreamModel, prefix: int, suffix: int, targets: dict[int, list[int]]):
        self.model, self.prefix, self.suffix, self.targets = model, prefix, suffix, targets
        self.vocab = model.config.vocab_size

    def __call__(self, canvases, select=None):
        outs = []
        for x, _, _ in canvases:
            B, N = x.shape
            logits = torch.zeros(B * N, self.vocab)
            for b in range(B):
                ids = x[b].tolist()
                if not any(ids):  # the spare canvas `advance` adds to tiny batches
                    continue
                start = next(i for i, t in enumerate(ids) if t != 0)  # left padding (pad id 0 in this test)
                target = self.targets[ids[start]]
                lo, hi = start + self.prefix, N - self.suffix
                for col in range(lo, hi):
                    j = col - lo
                    if j >= len(target):
                        token = DELETE
                    elif col == hi - 1 and hi - lo < len(target):
                        token = EXPAND
                    else:
                        token = target[j]
                    logits[b * N + col - 1, token] = 20.0 - 0.5 * col
            outs.append(logits)
        out = torch.cat(outs)
        return out if select is None else out[select]


@pytest.fixture()
def scripted(tiny_model):
    import copy

    model = copy.copy(tiny_model)
    model.config = copy.copy(tiny_model.config)
    model.config.mask_token_id, model.config.expand_token_id, model.config.delete_token_id = MASK, EXPAND, DELETE
    model.config.pad_token_id = 0
    return model


def _run(model, canvas, steps=40, limit=30, **kw):
    state = plan(model, torch.tensor(canvas), max_length=len(canvas[0]),
                 options=SamplerOptions(steps=steps, alg="maskgit_plus", length_limit=limit, **kw), seed=0,
                 output_history=True)
    while not state.done:
        advance(model, [state])
    return state


def test_expand_turns_a_slot_into_two_masks(scripted):
    scripted.packed_forward = Script(scripted, prefix=2, suffix=1, targets={1: [40, 41, 42, 43]})
    M = MASK
    state = _run(scripted, [[1, 2, M, M, 3]])
    history = [h[0].tolist() for h in state.history]
    assert history == [
        [1, 2, 40, M, 3],           # the leftmost slot commits its token
        [1, 2, 40, M, M, 3],        # the last slot asked to expand: two masks
        [1, 2, 40, 41, M, 3],
        [1, 2, 40, 41, M, M, 3],
        [1, 2, 40, 41, 42, M, 3],
        [1, 2, 40, 41, 42, 43, 3],  # as long as the target: no more expansion
    ]
    assert state.done and state.passes == 6


def test_delete_removes_the_slot_and_the_masks_after_it_in_its_gap(scripted):
    scripted.packed_forward = Script(scripted, prefix=2, suffix=1, targets={1: [40]})
    M = MASK
    state = _run(scripted, [[1, 2, M, M, M, M, 3]])
    assert [h[0].tolist() for h in state.history] == [[1, 2, 40, M, M, M, 3], [1, 2, 40, 3]]


def test_expansion_stops_at_the_length_limit(scripted):
    scripted.packed_forward = Script(scripted, prefix=2, suffix=1, targets={1: list(range(40, 60))})
    state = _run(scripted, [[1, 2, MASK, 3]], limit=7)
    assert len(state.x[0]) == 7 and state.x[0].tolist()[:2] == [1, 2] and state.x[0, -1] == 3
    assert MASK not in state.x[0].tolist() and EXPAND not in state.x[0].tolist()


def test_rows_of_different_final_lengths_batch_exactly(scripted):
    """Two rows of one state end at lengths 4 and 7 (left-padded), and each equals its row decoded alone; two
    states sharing forwards also equal each alone."""
    scripted.packed_forward = Script(scripted, prefix=2, suffix=1, targets={1: [40], 5: [50, 51, 52, 53]})
    M = MASK
    rows = [[1, 2, M, M, 3], [5, 2, M, M, 3]]
    together = _run(scripted, rows)
    alone = [_run(scripted, [r]).row_ids()[0] for r in rows]
    assert together.row_ids() == alone == [[1, 2, 40, 3], [5, 2, 50, 51, 52, 53, 3]]
    assert together.x.shape == (2, 7) and together.x[0, :3].tolist() == [0, 0, 0]  # left padding
    states = [plan(scripted, torch.tensor([r]), max_length=5, seed=0,
                   options=SamplerOptions(steps=40, alg="maskgit_plus", length_limit=30)) for r in rows]
    while not all(s.done for s in states):
        advance(scripted, states)
    assert [s.row_ids()[0] for s in states] == alone


def test_a_fixed_canvas_never_writes_the_length_states(scripted):
    scripted.packed_forward = Script(scripted, prefix=2, suffix=1, targets={1: [40, 41, 42, 43]})
    out = diffusion_generate(scripted, torch.tensor([[1, 2, MASK, MASK, 3]]), max_length=5, steps=2,
                             alg="maskgit_plus")
    assert out.shape == (1, 5) and EXPAND not in out[0].tolist() and DELETE not in out[0].tolist()


def test_length_limit_refuses_what_cannot_work(scripted, tiny_model):
    canvas = torch.tensor([[1, 2, MASK, 3]])
    old = torch.tensor([[1, 2, tiny_model.config.mask_token_id, 3]])  # a checkpoint trained without the states
    with pytest.raises(DreamError, match="no <\\|expand\\|>/<\\|delete\\|> tokens"):
        plan(tiny_model, old, max_length=4, options=SamplerOptions(alg="entropy", length_limit=10))
    for kwargs, message in [(dict(cache="prefix", block_length=2), "without block_length, cache"),
                            (dict(alg="origin"), "not origin")]:
        with pytest.raises(DreamError, match=message):
            SamplerOptions(**{"alg": "entropy", **kwargs}, length_limit=10)
    with pytest.raises(DreamError, match="must lie between"):
        plan(scripted, canvas, max_length=4, options=SamplerOptions(alg="entropy", length_limit=3))


def test_front_ends_ban_list_does_not_stop_the_states(scripted):
    """Text front ends ban the two states as non-text (unwritable_ids); with length_limit they still work."""
    from dreamlm.sampling import Constraints

    scripted.packed_forward = Script(scripted, prefix=2, suffix=1, targets={1: [40, 41, 42]})
    state = plan(scripted, torch.tensor([[1, 2, MASK, 3]]), max_length=4, seed=0,
                 options=SamplerOptions(steps=40, alg="maskgit_plus", length_limit=30),
                 constraints=Constraints(banned_token_ids=[EXPAND, DELETE, 7]))
    while not state.done:
        advance(scripted, [state])
    assert state.row_ids() == [[1, 2, 40, 41, 42, 3]]


# ---- infill(length="auto"), the template, old checkpoints ------------------------------------------------------
def test_infill_auto_on_an_old_checkpoint_is_a_one_line_error(tiny_model, tokenizer):
    from dreamlm.sampling import infill

    for kwargs, template in [({"length": "auto"}, "def f(x):\n    return <|mask|>\n"),
                             ({}, "def f(x):\n    return <|mask:auto|>\n")]:
        with pytest.raises(DreamError, match="no <\\|expand\\|>/<\\|delete\\|> tokens") as exc:
            infill(tiny_model, tokenizer, template, **kwargs)
        assert "\n" not in str(exc.value)


def test_template_auto_spans_parse(tokenizer):
    from dreamlm.sampling.infill import AUTO_START, parse_template

    mask = tokenizer.mask_token_id
    tpl = parse_template(tokenizer, "a <|mask:auto|> b <|mask:auto:7|> c", mask)
    assert tpl.auto and [b - a for a, b in tpl.spans] == [AUTO_START, 7]
    tpl = parse_template(tokenizer, "a <|mask:3|> b <|mask|>", mask, auto=True)
    assert tpl.auto and [b - a for a, b in tpl.spans] == [3, AUTO_START]
    with pytest.raises(DreamError, match="mixes <\\|mask:auto\\|> spans with fixed ones"):
        parse_template(tokenizer, "a <|mask:auto|> b <|mask:2|>", mask)


def test_final_spans_after_the_canvas_changed():
    """The first span grew by one, the second shrank to one: both found again by walking the fixed text."""
    from dreamlm.sampling.infill import final_spans

    assert final_spans([False, True, True, True, False, True, False], [(1, 3), (4, 9)]) == [(1, 4), (5, 6)]
    assert final_spans([False, False, False], [(1, 3), (4, 5)]) == [(1, 1), (2, 2)]  # both deleted to nothing


def _length_model(tmp_path):
    """A tiny checkpoint with the length states added, loaded in float32."""
    from dreamlm.checkpoint import add_length_tokens
    from dreamlm.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "old", seed=0)
    model = DreamModel.from_pretrained(tmp_path / "old", dtype=torch.float32)
    add_length_tokens(model, model.tokenizer)
    model.save_pretrained(tmp_path / "on", tokenizer=model.tokenizer)
    return DreamModel.from_pretrained(tmp_path / "on", dtype=torch.float32)


def test_live_view_follows_a_growing_canvas(tmp_path):
    """`infill --show`'s view: the scripted model grows a 4-mask span to 7 tokens; every frame is drawn (no index
    error on a longer canvas), the footer names the new length, and the last frame is the final text."""
    import io

    from rich.console import Console

    from dreamlm.sampling import infill
    from dreamlm.view import CanvasView, newly_filled

    model = _length_model(tmp_path)
    tok = model.tokenizer
    prompt, suffix = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    target = tok.encode(" a + b  # the sum")[:7]
    assert len(target) == 7
    model.packed_forward = _TokenScript(model.config, len(tok.encode(prompt)), len(tok.encode(suffix)), target)
    out = io.StringIO()
    view = CanvasView(tok, model.config.mask_token_id, 0, None, console=Console(file=out, width=200))
    frames: list[int] = []

    def hook(step, x, logits):
        frames.append(x.shape[1])
        return view(step, x, logits)

    result = infill(model, tok, prompt + "<|mask:auto|>" + suffix, generation_tokens_hook_func=hook, seed=0)
    view.close()
    assert result.fills == [tok.decode(target)]
    base = len(tok.encode(prompt)) + 4 + len(tok.encode(suffix))
    assert frames[0] == base and frames[-1] == base + 3 and sorted(frames) == frames
    assert f"canvas {base} → {base + 3} tokens" in out.getvalue()
    # new tokens are found from the nearer end of a canvas that changed length
    M = 99
    assert newly_filled([1, M, M, 5], [1, 7, M, M, 5], M) == [1]
    assert newly_filled([1, M, M, M, 5], [1, M, 8, 5], M) == [2]
    assert newly_filled([1, M, 5], [1, 6, 5], M) == [1]


# ---- the server: /v1/completions with a suffix and no max_tokens ------------------------------------------------
def test_server_suffix_with_automatic_length(tmp_path):
    """A model with the length states fills between prompt and suffix at the length it chooses: the scripted model
    asks for 5 tokens from 4 masks, so the answer is exactly those 5; n > 1 is refused in one line; an old model
    with a suffix keeps the fixed default length."""
    import httpx

    from dreamlm.checkpoint import add_length_tokens
    from dreamlm.serve import Limits
    from dreamlm.serve.app import load_models
    from dreamlm.serve.local import live_server
    from dreamlm.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "old", seed=0)
    model = DreamModel.from_pretrained(tmp_path / "old", dtype=torch.float32)
    add_length_tokens(model, model.tokenizer)
    model.save_pretrained(tmp_path / "on", tokenizer=model.tokenizer)
    limits = Limits(max_tokens=64, max_n=4, max_steps=256, timeout=60)
    models = load_models([tmp_path / "on", tmp_path / "old"], limits)
    served = models["on"]
    tok, config = served.tokenizer, served.model.config
    prompt, suffix = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    target = tok.encode(" a + b  # the sum")
    assert len(target) > 4
    served.model.packed_forward = _TokenScript(config, len(tok.encode(prompt)), len(tok.encode(suffix)), target)
    with live_server(limits=limits, models=models) as (url, _):
        body = {"model": "on", "prompt": prompt, "suffix": suffix, "seed": 0}
        res = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert res["choices"][0]["text"] == tok.decode(target)
        bad = httpx.post(url + "/v1/completions", json={**body, "n": 2}, timeout=60)
        assert bad.status_code == 400 and "n > 1 with a suffix of automatic length" in bad.json()["error"]["message"]
        # the per-step frames show the canvas growing, the answer ending where the suffix starts
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True, "stream_steps": True},
                          timeout=60) as resp:
            frames = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: {") and '"rows"' in line]
        lengths = [len(f["rows"][0]["tokens"]) for f in frames]
        assert lengths[0] < lengths[-1] and lengths == sorted(lengths)
        last = frames[-1]
        lo, hi = last["answer"]
        assert hi == lengths[-1] - len(tok.encode(suffix)) and hi - lo == len(target)
        assert "".join(last["rows"][0]["tokens"][lo:hi]) == tok.decode(target)
        fixed = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=60).json()
        assert fixed["usage"]["completion_tokens"] <= 3
        old = httpx.post(url + "/v1/completions", json={**body, "model": "old"}, timeout=60)
        assert old.status_code == 200  # a fixed canvas of the default length, as before


class _TokenScript:
    """Script for a one-gap canvas of a real tokenizer: slot j says target[j], the gap's last slot says expand while
    the gap is short, slots past the target say delete; leftmost most confident."""

    def __init__(self, config, prefix: int, suffix: int, target: list[int]):
        self.config, self.prefix, self.suffix, self.target = config, prefix, suffix, target

    def __call__(self, canvases, select=None):
        outs = []
        for x, _, _ in canvases:
            B, N = x.shape
            logits = torch.zeros(B * N, self.config.vocab_size)
            lo, hi = self.prefix, N - self.suffix
            for col in range(lo, hi):
                j = col - lo
                token = (self.config.delete_token_id if j >= len(self.target) else
                         self.config.expand_token_id if col == hi - 1 and hi - lo < len(self.target) else
                         self.target[j])
                for b in range(B):
                    logits[b * N + col - 1, token] = 20.0 - 0.5 * col
            outs.append(logits)
        out = torch.cat(outs)
        return out if select is None else out[select]


# ---- the vocabulary --------------------------------------------------------------------------------------------
def test_convert_with_length_tokens_keeps_every_old_logit(tmp_path, tokenizer):
    import json

    from typer.testing import CliRunner

    from dreamlm.cli import app
    from test_convert import source_model, write_ar_tokenizer

    src = tmp_path / "src"
    n_tok = write_ar_tokenizer(tokenizer, src, with_mask=False)
    hf = source_model("qwen2", n_tok)
    hf.save_pretrained(src)
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--length-tokens"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["mask_token_id"], cfg["expand_token_id"], cfg["delete_token_id"]) == (n_tok, n_tok + 1, n_tok + 2)
    assert cfg["vocab_size"] == n_tok + 3
    ours = DreamModel.from_pretrained(tmp_path / "out", causal=True)
    assert ours.tokenizer.token_to_id("<|expand|>") == n_tok + 1 and ours.config.length_states
    x = torch.randint(0, n_tok - 2, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x)[..., :n_tok], hf(input_ids=x).logits, atol=1e-5, rtol=0)
    # without the flag nothing changes: no keys in config.json, and the model says it cannot change length
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "plain")])
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "expand_token_id" not in plain and not DreamModel.from_pretrained(tmp_path / "plain").config.length_states
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "x.gguf"), str(tmp_path / "g"), "--length-tokens"])
    assert res.exit_code != 0 and "--length-tokens works on a directory" in res.output + res.stderr


def test_draw_noise_augments_a_share_of_rows_and_leaves_the_rest_as_before():
    from dreamlm.training.data import Batch
    from dreamlm.training.trainer import draw_noise

    x = torch.arange(100, 164).repeat(8, 1)
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, 0] = False
    batch = Batch(x, maskable, torch.zeros_like(maskable), torch.arange(8))
    states = LengthStates(MASK, EXPAND, DELETE, max_delete=4, max_middle=16)
    noise = draw_noise(batch, 0, 1e-3, MASK, length_rate=0.5, states=states, pad_id=0)
    plain = draw_noise(batch, 0, 1e-3, MASK)
    assert noise.x.shape == x.shape and noise.masked.shape == x.shape
    augmented = [not torch.equal(noise.masked[r], plain.masked[r]) for r in range(8)]
    assert 0 < sum(augmented) < 8
    for r in range(8):
        if not augmented[r]:  # the other rows draw exactly what Dream's objective draws
            assert torch.equal(noise.x[r], x[r]) and bool((noise.scale[r] == 1).all())
        deletes = (noise.x[r] == DELETE) & noise.masked[r]
        if deletes.any():  # a row's deletes share one token's weight
            assert abs(float(noise.scale[r][deletes].sum()) - 1) < 1e-6
    assert bool((noise.x == EXPAND).any() | (noise.x == DELETE).any())
