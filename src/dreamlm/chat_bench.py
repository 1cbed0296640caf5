"""`dreamlm bench chat`: short held-out chat prompts with checkable answers (dreamlm.chatset), the diffusion model
at 1, 2 and 4 tokens per step against the same base used autoregressively.

Every model answers from its chat template with greedy choices. The diffusion canvas is `max_new_tokens` masks after
the prompt (Dream fills what it does not need with EOS; the text is cut at the first EOS); k tokens per step means
max_new_tokens / k denoising steps. Scores: the share of right answers (a capital, a number, a word; Python functions
run against unit tests in a sandboxed subprocess), how many of the AR model's right answers the diffusion model
keeps, and generated tokens per second (answer tokens up to EOS over wall time, one prompt at a time).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dreamlm.chatset import ChatPrompt, chat_prompts, check_answer
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel


def _encode(model: DreamModel, prompt: ChatPrompt) -> torch.Tensor:
    tok = model.tokenizer
    return torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt.prompt}]))])


def _answer(model: DreamModel, ids: list[int]) -> tuple[str, int]:
    eos = model.config.eos_token_id
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)


def ar_answer(model: DreamModel, prompt: ChatPrompt, max_new_tokens: int) -> tuple[str, int]:
    """Greedy left-to-right answer of a causal model (KV cache), and its length in tokens."""
    from dreamlm.sampling.autoregressive import ar_generate

    x = _encode(model, prompt)
    out, _ = ar_generate(model, x, max_new_tokens)
    return _answer(model, out[0, x.shape[1]:].tolist())


def diffusion_answer(model: DreamModel, prompt: ChatPrompt, max_new_tokens: int, per_step: int,
                     alg: str = "entropy") -> tuple[str, int]:
    """Dream-style answer on a canvas of max_new_tokens masks, per_step tokens committed per step."""
    x = _encode(model, prompt)
    out = model.diffusion_generate(x, max_new_tokens=max_new_tokens, steps=max(1, max_new_tokens // per_step),
                                   alg=alg, temperature=0.0)
    return _answer(model, out[0, x.shape[1]:].tolist())


def run_method(name: str, prompts: list[ChatPrompt], answer: Callable[[ChatPrompt], tuple[str, int]],
               advance: Callable[..., None]) -> dict[str, Any]:
    """Answer and score every prompt with one method."""
    rows, tokens, began = [], 0, time.perf_counter()
    for p in prompts:
        text, n = answer(p)
        tokens += n
        rows.append({"family": p.family, "prompt": p.prompt, "answer": text, "right": check_answer(p, text)})
        advance(1, name)
    seconds = time.perf_counter() - began
    return {"accuracy": sum(r["right"] for r in rows) / len(rows), "tokens_per_s": tokens / seconds,
            "seconds": seconds, "cases": rows}


def chat_bench(diffusion: DreamModel, ar: DreamModel, n: int | None = None, max_new_tokens: int = 64,
               per_step: tuple[int, ...] = (1, 2, 4), alg: str = "entropy",
               advance: Callable[..., None] = lambda *a, **k: None, bodies: bool = True) -> dict[str, Any]:
    """Score the AR base and the diffusion model at each tokens-per-step on the held-out prompts (and, with
    `bodies`, on whole function bodies run against unit tests: see body_bench)."""
    from dreamlm.bench import machine

    if diffusion.causal or diffusion.config.mask_token_id is None:
        raise DreamError("the diffusion model must be bidirectional with a mask token")
    if not ar.causal:
        raise DreamError("the AR model must be causal (e.g. smollm2-ar)")
    if any(k < 1 or max_new_tokens % k for k in per_step):
        raise DreamError("every tokens-per-step value must be >= 1 and divide max_new_tokens")
    prompts = chat_prompts("held")[:n] if n else chat_prompts("held")
    methods = {"AR": run_method("AR", prompts, lambda p: ar_answer(ar, p, max_new_tokens), advance)}
    for k in per_step:
        label = f"diffusion, {k} token{'s' if k > 1 else ''}/step"
        methods[label] = run_method(label, prompts, lambda p, k=k: diffusion_answer(diffusion, p, max_new_tokens,
                                                                                      k, alg), advance)
    ar_right = [r["right"] for r in methods["AR"]["cases"]]
    for label, m in methods.items():
        kept = sum(a and r["right"] for a, r in zip(ar_right, m["cases"]))
        m["keeps_ar_right"] = kept / max(1, sum(ar_right))
    body = body_bench(diffusion, ar, alg=alg, advance=advance) if bodies else None
    return {"command": "dreamlm " + " ".join(sys.argv[1:]) if sys.argv else "", "machine": machine(),
            "bodies": body,
            "settings": {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "per_step": list(per_step),
                         "alg": alg, "decoding": "greedy (temperature 0)",
                         "dtype": str(diffusion.dtype).removeprefix("torch.")},
            "methods": methods}


def chat_table(report: dict[str, Any]) -> str:
    """Markdown table of the report."""
    lines = ["| method | right | keeps AR's right answers | tokens/s |", "|---|---|---|---|"]
    for label, m in report["methods"].items():
        lines.append(f"| {label} | {m['accuracy']:.1%} | {m['keeps_ar_right']:.1%} | {m['tokens_per_s']:.1f} |")
    s = report["settings"]
    text = "\n".join(lines) + (f"\n\n{s['prompts']} held-out prompts, {s['max_new_tokens']}-token canvas, "
                               f"{s['decoding']}, {s['dtype']}; machine: {report['machine']}\n")
    if report.get("bodies"):
        b = report["bodies"]
        text += f"\n| function bodies ({b['functions']}, unit tests in the sandbox) | pass rate |\n|---|---|\n"
        text += "".join(f"| {label} | {m['pass_rate']:.1%} |\n" for label, m in b["methods"].items())
    return text


def write_chat_report(report: dict[str, Any], out_dir: Path) -> None:
    """chat.md, chat.json and chat.png under out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "chat.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "chat.md").write_text(chat_table(report))
    labels = list(report["methods"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [report["methods"][k]["accuracy"] for k in labels], color="#4c72b0")
    ax.set_ylabel("right answers")
    ax.set_ylim(0, 1)
    ax.set_title("held-out chat prompts")
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(out_dir / "chat.png", dpi=110)
    plt.close(fig)


def body_prefix(name: str, args: str, does: str) -> str:
    """The code before a function body: signature and a one-line docstring, without the newline after it (BPE
    merges a newline with the next line's indentation, so a prefix ending in a bare newline tells a model that the
    next line starts at column 0)."""
    return f'def {name}({args}):\n    """{does[0].upper()}{does[1:]}."""'


def cut_body(text: str) -> str:
    """A function body continued left to right, up to the first line back at column 0 (where the function ends)."""
    kept = []
    for line in text.split("\n"):
        if line and not line[0].isspace():
            break
        kept.append(line)
    return "\n".join(kept)


def body_bench(diffusion: DreamModel, ar: DreamModel, masks: tuple[int, ...] = (16, 32), max_new_tokens: int = 48,
               alg: str = "entropy", advance: Callable[..., None] = lambda *a, **k: None,
               limit: int | None = None) -> dict[str, Any]:
    """Whole function bodies (dreamlm.chatset.FUNCTIONS) written after their signature and docstring and run against
    their unit tests in the sandbox: the diffusion model fills a canvas of k masks (it may fill the rest with EOS),
    the AR base continues the prefix until EOS or the first line back at column 0. Returns the pass rates."""
    from dreamlm.chatset import FUNCTIONS, check_code

    functions = FUNCTIONS[:limit] if limit else FUNCTIONS
    tok = diffusion.tokenizer
    eos = diffusion.config.eos_token_id
    methods: dict[str, dict[str, Any]] = {}

    def score(label: str, write: Callable[[str], str]) -> None:
        rows, began = [], time.perf_counter()
        for name, args, does, tests in functions:
            prefix = body_prefix(name, args, does)
            code = prefix + write(prefix)
            rows.append({"function": name, "code": code, "passed": check_code(code, tests)})
            advance(1, label)
        methods[label] = {"pass_rate": sum(r["passed"] for r in rows) / len(rows),
                          "seconds": time.perf_counter() - began, "cases": rows}

    def ar_body(prefix: str) -> str:
        from dreamlm.sampling.autoregressive import ar_generate

        x = torch.tensor([tok.encode(prefix)])
        out, _ = ar_generate(ar, x, max_new_tokens)
        ids = out[0, x.shape[1]:].tolist()
        text = tok.decode(ids[:ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)  # keep the indent
        return cut_body(text) + "\n"

    def diffusion_body(prefix: str, k: int) -> str:
        x = torch.tensor([tok.encode(prefix)])
        out = diffusion.diffusion_generate(x, max_new_tokens=k, steps=k, alg=alg, temperature=0.0)
        ids = [i for i in out[0, x.shape[1]:].tolist() if i != eos]
        return tok.decode(ids, skip_special_tokens=True) + "\n"

    score("AR (prefix only)", ar_body)
    for k in masks:
        score(f"diffusion, {k} masks", lambda prefix, k=k: diffusion_body(prefix, k))
    return {"functions": len(functions), "max_new_tokens": max_new_tokens, "methods": methods}
