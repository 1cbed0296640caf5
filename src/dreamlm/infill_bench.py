"""`dreamlm bench infill`: code infilling on held-out Python standard-library modules, diffusion against AR.

Tasks (every case comes from modules no model trained on: `stdlib:valid`, without the generated tables under
encodings/ and pydoc_data/); the context is sized to the smallest model context C (256 for the pipeline's models):
  line   one whole line of a function body between C/2 tokens before it and C/4 after it
  span-k k consecutive tokens of a held-out window, with the same context
  next   the same lines given only the code before them (left-to-right completion)
Every method is told the length of the answer in tokens (a diffusion canvas has that many masks; an AR model writes
that many tokens), so the comparison is of what is written, not of where to stop. The diffusion model is also run
with a *wrong* number of masks on the line task, to show the fixed-length limit. Each line case is kept only when
its prefix, line and suffix tokenise to the same ids apart as together, so the canvas is exactly what the model saw
in training. Held-out loss: next-token NLL for AR models, the Monte-Carlo ELBO (an upper bound on the NLL) for
diffusion models, both in bits per token on the same blocks. Every method fills the same cases, so each diffusion
model is compared with each AR model case by case: the mean difference in edit similarity with a 95 % paired
bootstrap interval (an interval that holds 0 means the bench cannot tell the two apart at this n).
"""

from __future__ import annotations

import ast
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dreamlm.errors import DreamError
from dreamlm.hub import require_model_dir
from dreamlm.model import DreamModel
from dreamlm.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, DreamTokenizer

SKIPPED_DIRS = {"encodings", "pydoc_data"}  # generated tables and help text, not code
KINDS = ("diffusion", "ar", "ar-fim")
# the pipeline of recipes/text (label, kind, run directory)
PIPELINE = (("AR → diffusion (CART)", "diffusion", "runs/text/ar2diff/final"),
            ("diffusion from scratch", "diffusion", "runs/text/diff-scratch/final"),
            ("AR", "ar", "runs/text/ar-full/final"),
            ("AR + FIM", "ar-fim", "runs/text/ar-fim/final"),
            ("AR stage 1 (half the tokens)", "ar", "runs/text/ar-stage/final"),
            ("AR 75 % → diffusion 25 %", "diffusion", "runs/text/split75-diff/final"))
BOOTSTRAP = 2000  # resamples of the paired interval
BODY_TOKENS = 48  # what an AR baseline may write for a function body (as `bench chat`'s body bench)


@dataclass
class Case:
    """One infilling problem in token ids: fill `middle` between `prefix` and `suffix` (empty for `next`)."""

    task: str
    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    where: str


@dataclass
class Entry:
    """A model in the comparison."""

    label: str
    kind: str
    path: Path
    model: DreamModel | None = field(default=None, repr=False)


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty strings."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def heldout_sources() -> list[tuple[str, str]]:
    """(name, source) of the held-out standard-library modules that parse, without generated tables."""
    from dreamlm.training.data import stdlib_root, stdlib_split

    root = stdlib_root()
    out = []
    for path in stdlib_split()[1]:
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            ast.parse(text)
        except SyntaxError:
            continue
        out.append((str(rel), text))
    if not out:
        raise DreamError("no held-out standard-library modules found on this Python")
    return out


def _left(tok: DreamTokenizer, text: str, n: int) -> list[int]:
    """The last n tokens of text (a window of characters, its first, possibly cut, token dropped)."""
    ids = tok.encode(text[-12 * n:])
    return ids[1:][-n:] if len(text) > 12 * n else ids[-n:]


def _right(tok: DreamTokenizer, text: str, n: int) -> list[int]:
    """The first n tokens of text (its last, possibly cut, token dropped when the text was cut)."""
    ids = tok.encode(text[:12 * n])
    return ids[:-1][:n] if len(text) > 12 * n else ids[:n]


def body_lines(source: str) -> list[int]:
    """Line numbers (1-based) of one-line statements inside function bodies: no docstrings, ASCII, 8-80 characters,
    indented by spaces."""
    lines = source.split("\n")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for stmt in ast.walk(node):
            if not isinstance(stmt, ast.stmt) or stmt is node or stmt.lineno != stmt.end_lineno:
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstrings
            line = lines[stmt.lineno - 1]
            content = line.strip()
            indent = len(line) - len(line.lstrip(" "))
            if (8 <= len(content) <= 80 and line.isascii() and indent >= 4 and line == line.rstrip()
                    and not content.startswith("#") and line[indent:] == content):
                found.add(stmt.lineno)
    return sorted(found)


@dataclass(frozen=True)
class Window:
    """Token budget of a case: context before and after, and the longest middle."""

    prefix: int = 128
    suffix: int = 64
    middle: int = 60

    @classmethod
    def for_context(cls, context: int, spare: int = 0) -> "Window":
        """Half the context before, a quarter after, the rest (less 3 FIM sentinels and `spare`) for the middle."""
        w = cls(context // 2, context // 4, context - context // 2 - context // 4 - 3 - spare)
        if w.middle < 1 or w.prefix < 8:
            raise DreamError(f"a model context of {context} tokens is too small for the infill bench")
        return w


def line_cases(tok: DreamTokenizer, n: int, seed: int = 0, window: Window = Window()
               ) -> tuple[list[Case], list[Case], int]:
    """n `line` cases and the matching `next` cases (same lines, no suffix); also how many candidates were dropped
    because their pieces tokenise differently apart than together (or the line is longer than the window allows)."""
    candidates = []
    for name, source in heldout_sources():
        for lineno in body_lines(source):
            candidates.append((name, source, lineno))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    lines_out: list[Case] = []
    nexts: list[Case] = []
    dropped = 0
    for name, source, lineno in candidates:
        if len(lines_out) == n:
            break
        lines = source.split("\n")
        start = sum(len(s) + 1 for s in lines[:lineno - 1])
        line = lines[lineno - 1]
        indent = len(line) - len(line.lstrip(" "))
        cut = start + indent - 1  # the last indent space belongs to the first word, as the BPE splits it
        end = start + len(line) + 1  # the line's newline is part of the middle
        before, middle_text, after = source[:cut], source[cut:end], source[end:]
        prefix, suffix = _left(tok, before, window.prefix), _right(tok, after, window.suffix)
        middle = tok.encode(middle_text)
        if len(prefix) < 8 or not middle or len(middle) > window.middle:
            dropped += 1
            continue
        joint = tok.encode(tok.decode(prefix) + middle_text + tok.decode(suffix))
        if joint != prefix + middle + suffix:
            dropped += 1
            continue
        where = f"{name}:{lineno}"
        lines_out.append(Case("line", prefix, middle, suffix, where))
        nexts.append(Case("next", prefix, middle, [], where))
    if len(lines_out) < n:
        raise DreamError(f"only {len(lines_out)} held-out lines qualify; ask for fewer (--n)")
    return lines_out, nexts, dropped


def span_cases(tok: DreamTokenizer, k: int, n: int, seed: int = 0, window: Window = Window()) -> list[Case]:
    """n windows of held-out code with k tokens in the middle to fill (one tokenisation of the whole window)."""
    if k > window.middle:
        raise DreamError(f"spans of {k} tokens do not fit the models' context (at most {window.middle})")
    P, S = window.prefix, window.suffix
    sources = [(name, s) for name, s in heldout_sources() if len(s) > 4000]
    rng = random.Random(seed * 1000 + k)
    cases = []
    while len(cases) < n:
        name, source = rng.choice(sources)
        at = rng.randrange(0, len(source) - 3000)
        ids = tok.encode(source[at:at + 3000])[1:-1]
        if len(ids) < P + k + S:
            continue
        cases.append(Case(f"span-{k}", ids[:P], ids[P:P + k], ids[P + k:P + k + S], f"{name}@{at}"))
    return cases


# ---- filling ----------------------------------------------------------------------------------------------------
def diffusion_fill(model: DreamModel, tok: DreamTokenizer, case: Case, length: int, alg: str = "entropy"
                   ) -> list[int]:
    """`length` masks between the prefix and suffix, decoded one token per step (in `alg`'s order, argmax)."""
    from dreamlm.sampling import Constraints, diffusion_generate
    from dreamlm.sampling.infill import unwritable_ids

    mask = model.config.mask_token_id
    canvas = torch.tensor([case.prefix + [mask] * length + case.suffix])
    out = diffusion_generate(model, canvas, max_length=canvas.shape[1], steps=length, alg=alg,
                             temperature=0.0, constraints=Constraints(banned_token_ids=unwritable_ids(model, tok)))
    ids = out if isinstance(out, torch.Tensor) else out.sequences
    return ids[0, len(case.prefix):len(case.prefix) + length].tolist()


def ar_fill(model: DreamModel, tok: DreamTokenizer, case: Case, fim: bool) -> list[int]:
    """Greedy left-to-right: prefix only, or (fim) <|fim_prefix|> P <|fim_suffix|> S <|fim_middle|>."""
    from dreamlm.sampling.autoregressive import ar_generate
    from dreamlm.sampling.infill import cut_at_eos

    if fim and case.suffix:
        ids = [tok.token_to_id(s) for s in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)]
        if None in ids:
            raise DreamError("an ar-fim model needs a tokenizer with the FIM sentinels")
        prompt = [ids[0], *case.prefix, ids[1], *case.suffix, ids[2]]
    else:
        prompt = case.prefix
    x, _ = ar_generate(model, torch.tensor([prompt]), len(case.middle), stop_at_eos=False)
    return cut_at_eos(x[0, len(prompt):].tolist(), model.config.eos_token_id)


def filler(entry: Entry, tok: DreamTokenizer, extra_masks: int = 0, alg: str = "entropy"
           ) -> Callable[[Case], list[int]]:
    """How `entry` fills a case: diffusion with the true length plus `extra_masks` (at least 1), decoded in `alg`'s
    order; AR with the true length (with the FIM prompt for an ar-fim model)."""
    model = entry.model
    assert model is not None
    if entry.kind == "diffusion":
        return lambda case: diffusion_fill(model, tok, case, max(1, len(case.middle) + extra_masks), alg)
    return lambda case: ar_fill(model, tok, case, entry.kind == "ar-fim")


def score_fills(tok: DreamTokenizer, cases: list[Case], fill: Callable[[Case], list[int]],
                examples: int = 3) -> dict[str, Any]:
    """Exact match and edit similarity of the decoded fills (whitespace at the ends ignored); `per_case` keeps each
    case's edit similarity, in case order, for the paired comparison."""
    exact, sims, shown = 0, [], []
    start = time.perf_counter()
    for case in cases:
        got = tok.decode(fill(case)).strip()
        want = tok.decode(case.middle).strip()
        exact += got == want
        sims.append(edit_similarity(got, want))
        if len(shown) < examples:
            shown.append({"where": case.where, "want": want, "got": got})
    return {"exact_match": exact / len(cases), "edit_similarity": sum(sims) / len(sims), "n": len(cases),
            "seconds": round(time.perf_counter() - start, 1), "examples": shown,
            "per_case": [round(x, 4) for x in sims]}


def paired_difference(a: list[float], b: list[float], resamples: int = BOOTSTRAP, seed: int = 0
                      ) -> dict[str, float]:
    """Mean of a - b over paired cases and its 95 % percentile bootstrap interval (cases resampled together)."""
    if len(a) != len(b) or not a:
        raise DreamError("a paired comparison needs the same, non-empty list of cases on both sides")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(len(a), (resamples, len(a)), generator=gen)].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(diff.mean()), "low": low, "high": high}


def paired_comparisons(results: dict[str, Any], tasks: list[str]) -> list[dict[str, Any]]:
    """Each diffusion model against each AR / AR-FIM model on every task: edit similarity, diffusion minus AR."""
    out = []
    for d_label, d in results.items():
        if d["kind"] != "diffusion":
            continue
        for b_label, b in results.items():
            if b["kind"] == "diffusion":
                continue
            out.append({"diffusion": d_label, "baseline": b_label,
                        "tasks": {t: paired_difference(d["tasks"][t]["per_case"], b["tasks"][t]["per_case"])
                                  for t in tasks}})
    return out


@torch.no_grad()
def heldout_bits(entry: Entry, blocks: torch.Tensor, mc_num: int) -> dict[str, Any]:
    """Bits per token of every block's tokens after the first: NLL (AR) or the MC ELBO bound (diffusion)."""
    from dreamlm.training.objective import bits_per_token, elbo_loglik

    model = entry.model
    assert model is not None
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    if model.causal:
        logits = model(blocks)[:, :-1].float()
        nll = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                                      reduction="sum"))
        measure = "NLL"
    else:
        nll = -sum(elbo_loglik(model, row[:1], row[1:], mc_num=mc_num, batch_size=mc_num, seed=0)
                   for row in blocks.tolist())
        measure = f"ELBO bound ({mc_num} samples)"
    return {"bits_per_token": bits_per_token(nll, tokens), "measure": measure, "tokens": tokens}


def load_entries(specs: list[tuple[str, str, Path]], dtype: str | None = None) -> list[Entry]:
    """Load each model (weights in `dtype`: see precision.inference_precision); the kind must match the model
    (diffusion: bidirectional with a mask id; ar*: causal)."""
    from dreamlm.precision import inference_precision

    weights = inference_precision(dtype, "cpu").dtype
    entries = []
    for label, kind, path in specs:
        if kind not in KINDS:
            raise DreamError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
        require_model_dir(path)
        model = DreamModel.from_pretrained(path, dtype=weights).eval()
        if model.tokenizer is None:
            raise DreamError(f"{path} has no tokenizer files")
        if (kind == "diffusion") == model.causal or (kind == "diffusion" and model.config.mask_token_id is None):
            raise DreamError(f"{path} is {'a causal (AR)' if model.causal else 'a diffusion'} model, not {kind}")
        entries.append(Entry(label, kind, path, model))
    probe = "def f(self, x):\n    return {'a': x} <|fim_middle|><|mask|><|endoftext|>"
    # the same ids for the same text (a tokenizer that only adds specials at its end, e.g. <|expand|>, still
    # matches); the probe's special tokens must be the same ids too
    if len({tuple(e.model.tokenizer.encode(probe)) for e in entries}) > 1:  # type: ignore[union-attr]
        raise DreamError("the models do not share one tokenizer; the comparison needs the same tokens")
    return entries


def infill_bench(specs: list[tuple[str, str, Path]], n: int = 200, spans: tuple[int, ...] = (4, 16),
                 wrong: tuple[int, ...] = (-2, 4), blocks: int = 16, mc_num: int = 32, seed: int = 0,
                 alg: str = "entropy", advance: Callable[..., None] | None = None, context: int = 512,
                 dtype: str | None = None) -> dict[str, Any]:
    """Score every model on every task (cases and held-out blocks within `context` tokens, or the smallest model
    context); returns the report (see write_infill_report)."""
    from dreamlm.bench import machine
    from dreamlm.training.data import PackedBlocks, stdlib_split

    step = advance or (lambda *a, **k: None)
    entries = load_entries(specs, dtype)
    tok = entries[0].model.tokenizer
    assert tok is not None
    context = min([context] + [e.model.config.context_length for e in entries if e.model is not None])
    window = Window.for_context(context, spare=max((0, *wrong)))
    lines, nexts, dropped = line_cases(tok, n, seed, window)
    tasks: dict[str, list[Case]] = {"line": lines}
    for k in spans:
        tasks[f"span-{k}"] = span_cases(tok, k, n, seed, window)
    tasks["next"] = nexts
    held = PackedBlocks(stdlib_split()[1], tok, context, seed=123).next_batch(blocks).x
    results: dict[str, Any] = {}
    for entry in entries:
        row: dict[str, Any] = {"kind": entry.kind, "path": str(entry.path), "tasks": {}}
        for task, cases in tasks.items():
            row["tasks"][task] = score_fills(tok, cases, filler(entry, tok, alg=alg))
            step(1, f"{entry.label}: {task}")
        if entry.kind == "diffusion":
            for delta in wrong:
                row["tasks"][f"line, {delta:+d} masks"] = score_fills(tok, lines, filler(entry, tok, delta, alg))
                step(1, f"{entry.label}: wrong length {delta:+d}")
        row["heldout"] = heldout_bits(entry, held, mc_num)
        step(1, f"{entry.label}: held-out loss")
        results[entry.label] = row
    return {"command": "dreamlm " + " ".join(sys.argv[1:]) if sys.argv else "", "machine": machine(),
            "settings": {"n": n, "spans": list(spans), "wrong_lengths": list(wrong), "blocks": blocks,
                         "mc_num": mc_num, "seed": seed, "context": context,
                         "dtype": str(entries[0].model.dtype).removeprefix("torch."), "prefix_tokens": window.prefix,
                         "suffix_tokens": window.suffix, "max_middle_tokens": window.middle,
                         "lines_dropped": dropped,
                         "decoding": f"diffusion: one token per step, {alg} order, argmax; AR: greedy",
                         "bootstrap_resamples": BOOTSTRAP},
            "tasks": list(tasks), "results": results, "paired": paired_comparisons(results, list(tasks))}


def infill_table(report: dict[str, Any]) -> str:
    """Markdown table: exact match / edit similarity per task, held-out bits per token."""
    tasks = report["tasks"]
    head = "| model | " + " | ".join(tasks) + " | held-out bits/token |"
    lines = [head, "|---" * (len(tasks) + 2) + "|"]
    for label, row in report["results"].items():
        cells = [f"{100 * row['tasks'][t]['exact_match']:.1f} % / {row['tasks'][t]['edit_similarity']:.2f}"
                 for t in tasks]
        h = row["heldout"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {h['bits_per_token']:.2f} "
                     f"({'ELBO' if h['measure'].startswith('ELBO') else 'NLL'}) |")
    wrong = [(label, t, r) for label, row in report["results"].items() for t, r in row["tasks"].items()
             if t not in tasks]
    if wrong:
        lines += ["", "Diffusion with the wrong number of masks (line task; the true length is what the table "
                  "above gives every method):", "", "| model | masks | exact match | edit similarity |",
                  "|---|---|---|---|"]
        lines += [f"| {label} | {t.split(', ')[1]} | {100 * r['exact_match']:.1f} % | {r['edit_similarity']:.2f} |"
                  for label, t, r in wrong]
    if report.get("paired"):
        lines += ["", "Diffusion minus AR, case by case (edit similarity: mean difference [95 % paired bootstrap "
                  "interval]; above 0 favours diffusion):", "", "| diffusion | against | " + " | ".join(tasks) + " |",
                  "|---" * (len(tasks) + 2) + "|"]
        for pair in report["paired"]:
            cells = [f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for c in pair["tasks"].values()]
            lines.append(f"| {pair['diffusion']} | {pair['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_infill_report(report: dict[str, Any], out_dir: Path) -> None:
    """infill.md, infill.json and infill.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    (out_dir / "infill.md").write_text(
        f"`{report['command']}` on {report['machine']}; {s['n']} cases per task from held-out standard-library "
        f"modules; cells are exact match / edit similarity\n\n{infill_table(report)}\n")
    (out_dir / "infill.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, labels = report["tasks"], list(report["results"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        row = report["results"][label]["tasks"]
        left.bar([x + i * width for x in range(len(tasks))], [row[t]["edit_similarity"] for t in tasks],
                 width=width, label=label)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks)
    left.set_ylabel("edit similarity (exact match: see the table)")
    left.legend(fontsize=8)
    right.bar(range(len(labels)), [report["results"][lb]["heldout"]["bits_per_token"] for lb in labels],
              color=[f"C{i}" for i in range(len(labels))])
    right.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    right.set_ylabel("held-out bits/token (AR: NLL, diffusion: ELBO)")
    fig.tight_layout()
    fig.savefig(out_dir / "infill.png", dpi=120)
    plt.close(fig)


# ---- length modes (issue 30: infilling without knowing the gap's length) ---------------------------------------
LENGTH_MODES = ("oracle", "0.5x", "2x", "auto")
AUTO_START = 4  # masks an automatic-length gap starts from (DreamOn's default)


def parse_length_modes(text: str) -> tuple[str, ...]:
    """`oracle,0.5x,2x,auto` -> the modes, each checked."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in LENGTH_MODES]
    if bad or not modes:
        raise DreamError(f"--lengths takes a comma-separated subset of {','.join(LENGTH_MODES)}, got {text!r}")
    return modes


def diffusion_fill_auto(model: DreamModel, tok: DreamTokenizer, case: Case, start: int = AUTO_START,
                        max_span: int = 64, alg: str = "entropy") -> list[int]:
    """Automatic length (DreamOn): `start` masks between prefix and suffix; the model grows (`<|expand|>`) and
    shrinks (`<|delete|>`) the gap, one token committed a step, up to `max_span` tokens."""
    from dreamlm.sampling import Constraints, diffusion_generate
    from dreamlm.sampling.infill import final_spans, unwritable_ids

    mask = model.config.mask_token_id
    canvas = torch.tensor([case.prefix + [mask] * start + case.suffix])
    limit = min(len(case.prefix) + len(case.suffix) + max_span, model.config.context_length)
    out = diffusion_generate(model, canvas, max_length=canvas.shape[1], steps=2 * max_span, alg=alg,
                             temperature=0.0, length_limit=limit, return_dict_in_generate=True,
                             constraints=Constraints(banned_token_ids=unwritable_ids(model, tok)))
    keep = out.pad_mask[0].bool() if out.pad_mask is not None else torch.ones_like(out.sequences[0], dtype=torch.bool)
    ids, slots = out.sequences[0][keep].tolist(), out.slots[0][keep].tolist()
    ((a, b),) = final_spans(slots, [(len(case.prefix), len(case.prefix) + start)])
    return ids[a:b]


def length_filler(model: DreamModel, tok: DreamTokenizer, mode: str, max_span: int, alg: str
                  ) -> Callable[[Case], list[int]]:
    """How a diffusion model fills a case in one length mode: the true length, half or twice it (fixed canvases),
    or automatic."""
    if mode == "auto":
        return lambda case: diffusion_fill_auto(model, tok, case, AUTO_START, max_span, alg)
    scale = {"oracle": 1.0, "0.5x": 0.5, "2x": 2.0}[mode]
    return lambda case: diffusion_fill(model, tok, case, max(1, round(scale * len(case.middle))), alg)


def body_cases(tok: DreamTokenizer, context: int | None = None) -> list[tuple[Case, list[str]]]:
    """Whole function bodies with unit tests (dreamlm.chatset.FUNCTIONS): the signature and docstring before, a
    short right body (chatset.BODIES) as the middle, which gives the true length, and the file's last newline
    after. With `context`, only the cases whose 2x canvas fits it."""
    from dreamlm.chat_bench import body_prefix
    from dreamlm.chatset import BODIES, FUNCTIONS

    cases = [(Case("body", tok.encode(body_prefix(name, args, does)), tok.encode("\n    " + BODIES[name]),
                   tok.encode("\n"), name), tests) for name, args, does, tests in FUNCTIONS]
    return [(case, tests) for case, tests in cases
            if context is None or len(case.prefix) + 2 * len(case.middle) + len(case.suffix) <= context]


def score_bodies(tok: DreamTokenizer, cases: list[tuple[Case, list[str]]], fill: Callable[[Case], list[int]],
                 examples: int = 3) -> dict[str, Any]:
    """Pass rate of the filled functions against their unit tests (in the sandbox) and edit similarity of the bodies
    to the reference ones."""
    from dreamlm.chatset import check_code

    passed, sims, shown = 0, [], []
    start = time.perf_counter()
    for case, tests in cases:
        got = tok.decode(fill(case), skip_special_tokens=True)
        ok = check_code(tok.decode(case.prefix) + got + "\n", tests)
        passed += ok
        sims.append(edit_similarity(got.strip(), tok.decode(case.middle).strip()))
        if len(shown) < examples:
            shown.append({"where": case.where, "got": got, "passed": ok})
    return {"pass_rate": passed / len(cases), "edit_similarity": sum(sims) / len(sims), "n": len(cases),
            "seconds": round(time.perf_counter() - start, 1), "examples": shown}


def ar_fill_free(model: DreamModel, tok: DreamTokenizer, case: Case, max_new_tokens: int) -> list[int]:
    """The AR baseline of the length modes, told no length: greedy from the prefix alone (until EOS or
    `max_new_tokens`), cut where the gap ends: after the line's newline (a line case) or before the first line back at
    column 0 (a function body)."""
    from dreamlm.chat_bench import cut_body
    from dreamlm.sampling.autoregressive import ar_generate
    from dreamlm.sampling.infill import cut_at_eos

    room = model.config.context_length - len(case.prefix)
    x, _ = ar_generate(model, torch.tensor([case.prefix]), max(1, min(max_new_tokens, room)))
    text = tok.decode(cut_at_eos(x[0, len(case.prefix):].tolist(), model.config.eos_token_id),
                      skip_special_tokens=True)
    if case.task == "body":
        text = cut_body(text)
    elif "\n" in text:
        text = text[:text.index("\n") + 1]
    return tok.encode(text)


def length_bench(specs: list[tuple[str, str, Path]], n: int = 100, modes: tuple[str, ...] = LENGTH_MODES,
                 seed: int = 0, alg: str = "entropy", advance: Callable[..., None] | None = None,
                 context: int = 512, dtype: str | None = None) -> dict[str, Any]:
    """Whole-line infill on held-out stdlib code and whole function bodies run against unit tests (`body_cases`),
    at each length mode, for every diffusion model; lines are limited to what fits twice in the window (the 2x
    canvas). A model without the length states gets no `auto` row (reported as refused)."""
    from dreamlm.bench import machine

    step = advance or (lambda *a, **k: None)
    entries = load_entries(specs, dtype)
    if any(e.kind == "ar-fim" for e in entries):
        raise DreamError("--lengths takes diffusion=PATH models and ar=PATH baselines (prefix only), not ar-fim")
    tok = entries[0].model.tokenizer
    assert tok is not None
    context = min([context] + [e.model.config.context_length for e in entries if e.model is not None])
    full = Window.for_context(context)
    spare = full.middle // 2  # the 2x canvas holds twice the longest line
    window = Window(full.prefix, full.suffix, full.middle - spare)
    lines, _, dropped = line_cases(tok, n, seed, window)
    max_span = context - full.prefix - full.suffix
    bodies = body_cases(tok, context)
    if not bodies:
        raise DreamError(f"no function body fits a context of {context} tokens twice over; raise --context")
    results: dict[str, Any] = {}
    for entry in entries:
        model = entry.model
        assert model is not None
        if entry.kind == "ar":  # told no length: it writes until the line or the function ends
            results[entry.label] = {"path": str(entry.path), "kind": "ar", "modes": {}, "bodies": {}, "free": {
                "lines": score_fills(tok, lines, lambda case: ar_fill_free(model, tok, case, 2 * window.middle)),
                "bodies": score_bodies(tok, bodies, lambda case: ar_fill_free(model, tok, case, BODY_TOKENS))}}
            step(len(modes), f"{entry.label}: AR, prefix only")
            continue
        row: dict[str, Any] = {"path": str(entry.path), "length_states": model.config.length_states, "modes": {},
                               "bodies": {}}
        for mode in modes:
            if mode == "auto" and not model.config.length_states:
                row["modes"][mode] = row["bodies"][mode] = {"refused": "no <|expand|>/<|delete|> tokens"}
            else:
                fill = length_filler(model, tok, mode, max_span, alg)
                row["modes"][mode] = score_fills(tok, lines, fill)
                row["bodies"][mode] = score_bodies(tok, bodies, fill)
            step(1, f"{entry.label}: line and body @ {mode}")
        results[entry.label] = row
    return {"command": "dreamlm " + " ".join(sys.argv[1:]) if sys.argv else "", "machine": machine(),
            "settings": {"n": n, "seed": seed, "context": context, "modes": list(modes), "auto_start": AUTO_START,
                         "max_span": max_span, "max_line_tokens": window.middle, "lines_dropped": dropped,
                         "bodies": len(bodies),
                         "prefix_tokens": window.prefix, "suffix_tokens": window.suffix,
                         "decoding": f"one token committed per step, {alg} order, argmax; auto: DreamOn's "
                                     "expand/delete transitions between steps; AR: greedy from the prefix alone, "
                                     "cut where the line or the function ends",
                         "dtype": str(entries[0].model.dtype).removeprefix("torch.")},
            "results": results}


def length_table(report: dict[str, Any]) -> str:
    """Markdown: exact match / edit similarity of whole-line infill per length mode."""
    modes = report["settings"]["modes"]
    free = any("free" in row for row in report["results"].values())
    columns = list(modes) + (["AR, prefix only (no length)"] if free else [])
    lines = ["| model | what | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for label, row in report["results"].items():
        for what, key, cell in (("lines: exact / edit sim.", "modes",
                                 lambda r: f"{100 * r['exact_match']:.1f} % / {r['edit_similarity']:.3f}"),
                                ("bodies: tests passed / edit sim.", "bodies",
                                 lambda r: f"{100 * r['pass_rate']:.1f} % / {r['edit_similarity']:.3f}")):
            if key not in row:  # a report from before the body rows
                continue
            if "free" in row:
                cells = ["—"] * len(modes) + [cell(row["free"]["lines" if key == "modes" else "bodies"])]
            else:
                cells = ["refused (no length states)" if "refused" in r else cell(r)
                         for r in (row[key][m] for m in modes)] + (["—"] if free else [])
            lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_length_report(report: dict[str, Any], out_dir: Path) -> None:
    """infill-lengths.md and infill-lengths.json under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    (out_dir / "infill-lengths.md").write_text(
        f"`{report['command']}` on {report['machine']}; {s['n']} held-out whole lines (at most "
        f"{s['max_line_tokens']} tokens, {s['prefix_tokens']} tokens before, {s['suffix_tokens']} after) and "
        f"{s.get('bodies', 0)} function bodies run against their unit tests in the sandbox; {s['decoding']}; "
        f"auto starts from {s['auto_start']} masks and may grow "
        f"to {s['max_span']}\n\n{length_table(report)}\n")
    (out_dir / "infill-lengths.json").write_text(json.dumps(report, indent=2) + "\n")
