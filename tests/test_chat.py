"""Chat prompts (train/held-out split, answer checks), the code sandbox, and the chat bench on tiny models."""

from __future__ import annotations

import torch
import pytest

from dreamlm.chat_bench import chat_bench, chat_table
from dreamlm.chatset import ChatPrompt, chat_prompts, check_answer, extract_code
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.sandbox import run_python


def test_training_and_held_out_prompts_never_share_a_question():
    train, held = chat_prompts("train"), chat_prompts("held")
    assert len(held) >= 50 and len(train) >= 200
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert {p.family for p in held} >= {"capital", "add", "code", "opposite"}
    assert all(p.expect or p.tests for p in held)  # every held-out prompt is checkable
    assert chat_prompts("held") == held  # a fixed order


def test_answers_are_checked_by_whole_words_and_numbers():
    capital = ChatPrompt("capital", "What is the capital of France?", ["Paris"])
    assert check_answer(capital, "The capital of France is Paris.")
    assert not check_answer(capital, "It is Lyon (not Parisian).")
    add = ChatPrompt("add", "What is 9 + 9?", ["18"])
    assert check_answer(add, "9 + 9 = 18") and not check_answer(add, "118") and not check_answer(add, "1.18")


def test_code_answers_run_against_unit_tests():
    p = ChatPrompt("code", "Write square(x).", tests=["square(3) == 9", "square(-2) == 4"], function="square")
    good = "Here it is:\n```python\ndef square(x):\n    return x * x\n```\nDone."
    assert extract_code(good).strip().startswith("def square")
    assert check_answer(p, good)
    assert not check_answer(p, "```python\ndef square(x):\n    return x + x\n```")
    assert not check_answer(p, "I cannot write code.")


@pytest.mark.parametrize("code,fragment", [
    ("import socket; socket.create_connection(('127.0.0.1', 9))", "sandbox: socket"),
    ("open('/tmp/dreamlm-sandbox-escape.txt', 'w').write('x')", "writing outside"),
    ("import subprocess; subprocess.run(['true'])", "subprocess.Popen"),
    ("import os; os.system('true')", "os.system"),
    ("x = bytearray(3 * 1024 ** 3)", "MemoryError"),
])
def test_the_sandbox_refuses(code, fragment):
    result = run_python(code, timeout=5)
    assert not result.ok and fragment in result.output


def test_the_sandbox_runs_code_stops_loops_and_keeps_writes_inside():
    ok = run_python("open('here.txt', 'w').write('hi')\nprint(open('here.txt').read())")
    assert ok.ok and ok.output.strip() == "hi"
    slow = run_python("while True:\n    pass", timeout=1)
    assert not slow.ok and slow.timed_out


def test_chat_bench_scores_every_method_on_tiny_models(tiny_dir, monkeypatch):
    diffusion = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ar = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32, causal=True).eval()
    seen = []
    import dreamlm.chat_bench as bench

    real = bench.check_answer
    monkeypatch.setattr(bench, "check_answer", lambda p, a: seen.append(a) or real(p, a))
    report = chat_bench(diffusion, ar, n=3, max_new_tokens=4, per_step=(1, 2, 4), bodies=False)
    assert list(report["methods"]) == ["AR", "diffusion, 1 token/step", "diffusion, 2 tokens/step",
                                       "diffusion, 4 tokens/step"]
    assert len(seen) == 4 * 3
    for m in report["methods"].values():
        assert 0 <= m["accuracy"] <= 1 and m["tokens_per_s"] >= 0 and len(m["cases"]) == 3
    assert "| AR |" in chat_table(report)
    with pytest.raises(DreamError, match="divide"):
        chat_bench(diffusion, ar, n=1, max_new_tokens=5, per_step=(2,))
    with pytest.raises(DreamError, match="causal"):
        chat_bench(diffusion, diffusion, n=1)


def test_body_bench_runs_every_written_body_against_its_tests(tiny_dir, monkeypatch):
    import dreamlm.chat_bench as bench
    import dreamlm.chatset as chatset

    diffusion = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ar = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32, causal=True).eval()
    ran = []
    real = chatset.check_code
    monkeypatch.setattr(chatset, "check_code", lambda code, tests: ran.append(code) or real(code, tests))
    report = bench.body_bench(diffusion, ar, masks=(4,), max_new_tokens=4, limit=2)
    assert list(report["methods"]) == ["AR (prefix only)", "diffusion, 4 masks"] and len(ran) == 4
    assert all(code.startswith("def reverse_string(s):") or code.startswith("def is_even(n):") for code in ran)
    assert all(m["pass_rate"] == 0.0 for m in report["methods"].values())  # random weights write no working body
    assert bench.body_prefix("square", "x", "returns x squared") == 'def square(x):\n    """Returns x squared."""'


def test_ar_bodies_keep_their_indentation(tiny_dir, monkeypatch):
    import dreamlm.chat_bench as bench
    import dreamlm.sampling.autoregressive as autoregressive

    ar = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32, causal=True).eval()
    tok = ar.tokenizer
    body = tok.encode("\n    return s[::-1]\nprint(1)\n")

    def scripted(model, x, max_new_tokens):  # an AR model that writes a right body, then code at column 0
        return torch.cat([x, torch.tensor([body])], 1), len(body)
    monkeypatch.setattr(autoregressive, "ar_generate", scripted)
    report = bench.body_bench(ar, ar, masks=(), max_new_tokens=len(body), limit=1)
    case = report["methods"]["AR (prefix only)"]["cases"][0]
    assert case["code"].endswith('    return s[::-1]\n') and case["passed"]
