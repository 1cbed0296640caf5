"""Infilling and format templates: only the spans change; banned ids never appear; position 0 is never a mask."""

from __future__ import annotations

import json

import pytest
import torch

from dreamlm.errors import DreamError
from dreamlm.sampling import cut_at_eos, infill, json_template, parse_template


def test_parse_template_expands_spans(tiny_model, tokenizer):
    m = tiny_model.config.mask_token_id
    tpl = parse_template(tokenizer, "a<|mask:3|>b<|mask|>", m)
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    assert tpl.ids == a + [m] * 3 + b + [m]
    assert tpl.spans == [(len(a), len(a) + 3), (len(a) + 3 + len(b), len(a) + 4 + len(b))]


@pytest.mark.parametrize("alg", ["origin", "entropy", "maskgit_plus"])
def test_only_the_spans_change(tiny_model, tokenizer, alg):
    template = "def add(a, b):\n    return <|mask:4|>\n\nprint(<|mask:2|>)\n"
    res = infill(tiny_model, tokenizer, template, alg=alg, temperature=0.5, seed=1)
    tpl = parse_template(tokenizer, template, tiny_model.config.mask_token_id)
    outside = [i for i in range(len(tpl.ids)) if not any(a <= i < b for a, b in tpl.spans)]
    assert [res.ids[i] for i in outside] == [tpl.ids[i] for i in outside]
    assert len(res.ids) == len(tpl.ids)
    assert not any(t == tiny_model.config.mask_token_id for t in res.ids)
    # the text outside the spans is byte-identical
    (a1, b1), (a2, b2) = res.spans
    assert res.text.startswith(tokenizer.decode(tpl.ids[:a1]))
    assert res.text.endswith(tokenizer.decode(tpl.ids[b2:]))
    assert tokenizer.decode(res.ids[b1:a2]) == tokenizer.decode(tpl.ids[b1:a2])


def test_banned_ids_never_appear(tiny_model, tokenizer):
    free = infill(tiny_model, tokenizer, "x = <|mask:12|>", alg="entropy")
    banned = sorted(set(free.ids[free.spans[0][0]:]))
    res = infill(tiny_model, tokenizer, "x = <|mask:12|>", alg="entropy", banned_token_ids=banned)
    a, b = res.spans[0]
    assert not set(res.ids[a:b]) & set(banned)


def test_leading_mask_needs_bos(tiny_model, tokenizer):
    m = tiny_model.config.mask_token_id
    with pytest.raises(DreamError, match="starts with a mask"):
        parse_template(tokenizer, "<|mask:2|> world", m, bos_token_id=None)
    tpl = parse_template(tokenizer, "<|mask:2|> world", m, bos_token_id=7)
    assert tpl.ids[0] == 7 and tpl.spans == [(1, 3)]
    res = infill(tiny_model, tokenizer, "<|mask:2|> world")  # the tiny model's BOS is <|endoftext|>
    assert res.ids[0] == tiny_model.config.bos_token_id


def test_template_errors(tiny_model, tokenizer):
    m = tiny_model.config.mask_token_id
    with pytest.raises(DreamError, match="no mask span"):
        parse_template(tokenizer, "nothing to fill", m)
    with pytest.raises(DreamError, match="unknown special token <\\|nope\\|>"):
        parse_template(tokenizer, "a <|nope|> <|mask|>", m)
    with pytest.raises(DreamError, match="span needs"):
        parse_template(tokenizer, "a <|mask:0|>", m)


def test_json_template_keeps_the_skeleton(tiny_model, tokenizer):
    template = json_template({"name": 3, "kind": "fixed", "age": 2})
    assert template == '{"name": <|mask:3|>, "kind": "fixed", "age": <|mask:2|>}'
    res = infill(tiny_model, tokenizer, template, alg="entropy")
    assert res.text.startswith('{"name": ') and '"kind": "fixed", "age": ' in res.text and res.text.endswith("}")
    assert len(res.fills) == 2


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 0, 7, 0], 0) == [5, 6]
    assert cut_at_eos([0, 5, 0, 7], 0, start=1) == [0, 5]
    assert cut_at_eos([5, 6], 0) == [5, 6]
    assert cut_at_eos([5, 0], None) == [5, 0]
