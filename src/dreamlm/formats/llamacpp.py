"""llama.cpp (through `llama-cpp-python`, the `[llamacpp]` extra) running dreamlm's `dream` GGUF exports.

- `LlamaCppDream`: a GGUF loaded in llama.cpp with one non-causal context; `forward(ids)` gives every position's
  logits in the AR convention (output j scores token j + 1, as our model's raw output), from one decode.
- `llamacpp_generate`: a whole diffusion generation whose forwards are llama.cpp's and whose steps are dreamlm's
  step machine (`plan` -> `DecodeState.step`), so a token-for-token comparison tests the exported model, not two
  samplers. (llama.cpp's own loop, `llama-diffusion-cli`, is C++ only and differs from Dream's sampler by design:
  see docs/llamacpp.md.)
- `check_interop`: export a model at some types, compare one masked forward's logits with dreamlm's (max abs diff,
  argmax agreement and KL over the masked slots) and one full generation's tokens.
- `quantize_gguf`: llama.cpp's own quantizer (k-quants such as Q4_K_M, which the `gguf` library cannot write).

llama.cpp's `dream` graph keeps no KV memory, so each decode is the whole canvas in one micro-batch (the context's
batch sizes are the canvas length) and every position is an output.
"""

from __future__ import annotations

import ctypes
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dreamlm.errors import DreamError

INSTALL_HINT = "pip install 'dreamlm[llamacpp]' (it builds llama.cpp from source: minutes)"
# llama.cpp's file types (enum llama_ftype) for the k-quants its quantizer writes and the gguf library cannot
LLAMA_FTYPES = {"q4_k": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M; llama-quantize's "Q4_K" is an alias of Q4_K_M


def require_llama_cpp() -> Any:
    """The `llama_cpp` module, or DreamError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:  # ImportError also covers a build whose shared library fails to load
        raise DreamError(f"llama-cpp-python is not importable ({exc}); {INSTALL_HINT}") from None
    return llama_cpp


_QUIET: Any = None  # the log callback llama.cpp holds; kept alive here


def _silence(lib: Any) -> None:
    """Route llama.cpp's log (hundreds of lines per model load) to nowhere; errors come back as return codes."""
    global _QUIET
    if _QUIET is None:
        _QUIET = lib.llama_log_callback(lambda level, text, user: None)
        lib.llama_log_set(_QUIET, ctypes.c_void_p(0))
        lib.llama_backend_init()


class LlamaCppDream:
    """A `dream` GGUF in llama.cpp with a non-causal context of `n_ctx` tokens (the canvas length)."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None,
                 flash_attn: bool | None = False) -> None:
        lib = require_llama_cpp()
        _silence(lib)
        self.lib, self.path, self.n_ctx = lib, Path(path), int(n_ctx)
        if not self.path.is_file():
            raise DreamError(f"{self.path} does not exist")
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise DreamError(f"llama.cpp could not load {self.path} (run with LLAMA_LOG to see why)")
        self.ctx = None
        try:
            if not lib.llama_model_is_diffusion(self.model):
                raise DreamError(f"llama.cpp does not read {self.path} as a diffusion model")
            vocab = lib.llama_model_get_vocab(self.model)
            self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
            self.mask_token_id = int(lib.llama_vocab_mask(vocab))
            threads = threads or torch.get_num_threads()
            cp = lib.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ctx
            cp.n_seq_max = 1
            cp.n_threads = cp.n_threads_batch = threads
            # flash attention off by default: on a CPU its kernel rounds K and V through f16 (0.07 max abs logit
            # difference on a solver, ~30 % faster there); None is llama.cpp's own default (auto: on for a CPU)
            cp.flash_attn_type = -1 if flash_attn is None else int(flash_attn)
            cp.no_perf = True
            self.ctx = lib.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise DreamError(f"llama.cpp could not make a {self.n_ctx}-token context for {self.path}")
            lib.llama_set_causal_attn(self.ctx, False)
            self.batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        except BaseException:
            self.close()
            raise

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (L, V) float32 of one canvas, every position, unshifted (output j scores token j + 1)."""
        n = len(ids)
        if not 0 < n <= self.n_ctx:
            raise DreamError(f"a canvas of {n} tokens does not fit this {self.n_ctx}-token llama.cpp context")
        b = self.batch
        b.n_tokens = n
        for i, token in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(token), i, 1, 1
            b.seq_id[i][0] = 0
        ret = self.lib.llama_decode(self.ctx, b)
        if ret != 0:
            raise DreamError(f"llama.cpp's decode failed (code {ret}) on a {n}-token canvas")
        out = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(out, shape=(n, self.n_vocab)).copy()

    def close(self) -> None:
        """Free the context, batch and model (idempotent)."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaCppDream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def llamacpp_logits(llm: LlamaCppDream, x: torch.Tensor) -> torch.Tensor:
    """Shifted logits (B, N, V) of canvases `x` (B, N) from llama.cpp, one decode per row, as the sampler reads them.
    A model whose embedding has more rows than llama.cpp's vocabulary cannot happen for our exports (tokens are
    padded to the embedding)."""
    from dreamlm.sampling.generate import shift_logits

    rows = [torch.from_numpy(llm.forward(row.tolist())) for row in x.cpu()]
    return shift_logits(torch.stack(rows)).to(x.device)


@torch.no_grad()
def llamacpp_generate(llm: LlamaCppDream, model: Any, input_ids: torch.Tensor, max_new_tokens: int,
                      seed: int | None = 0, **options: Any) -> tuple[torch.Tensor, int]:
    """dreamlm's sampler (spec §2; `options` are SamplerOptions' fields, cache excluded) with every forward run by
    llama.cpp; `model` supplies only the config (ids, context). Returns (ids (B, N), forward passes)."""
    from dreamlm.sampling.generate import plan
    from dreamlm.sampling.options import CacheMode, SamplerOptions

    opts = SamplerOptions(**options)
    if opts.cache is not CacheMode.NONE:
        raise DreamError("llama.cpp's dream graph keeps no key/value memory; use cache='none'")
    state = plan(model, input_ids, max_new_tokens=max_new_tokens, options=opts, seed=seed)
    while not state.done:
        targets = state.prepare()
        if targets is None:
            break
        if not state.needs_forward:
            state.step(None)
            continue
        full = llamacpp_logits(llm, state.x)
        state.passes += 1
        state.step(full if state.wants_full_logits else full[targets])
    return state.x, state.passes


def quantize_gguf(source: str | Path, out: str | Path, type: str, threads: int | None = None) -> Path:
    """Quantize a GGUF (f32/f16/bf16) with llama.cpp's own quantizer to `type` (q4_k = llama.cpp's Q4_K_M)."""
    lib = require_llama_cpp()
    _silence(lib)
    if type not in LLAMA_FTYPES:
        raise DreamError(f"llama.cpp quantization to {type!r} is not offered; choose {', '.join(LLAMA_FTYPES)}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[type]
    params.nthread = threads or torch.get_num_threads()
    ret = lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if ret != 0:
        raise DreamError(f"llama.cpp's quantizer failed on {source} (code {ret})")
    return Path(out)


# ---- the interop check ----------------------------------------------------------------------------------------------
@dataclass
class LogitsComparison:
    """One masked canvas through dreamlm (float32) and llama.cpp (the GGUF at `type`)."""

    type: str
    file_mib: float
    canvas: int
    masked: int
    max_abs_diff: float  # over every position and vocabulary entry, raw outputs
    max_abs_logit: float  # the scale the difference is measured against
    argmax_agreement: float  # over the masked slots, shifted as the sampler reads them
    kl_mean: float  # KL(dreamlm || llama.cpp) per masked slot, nats
    kl_max: float


@dataclass
class GenerationComparison:
    """One full diffusion generation: dreamlm's own forwards vs llama.cpp's, the same step machine and seed."""

    type: str
    alg: str
    steps: int
    new_tokens: int
    tokens_agree: bool
    agreement: float  # fraction of generated positions with the same token
    first_difference: int | None  # canvas position of the first differing token
    dreamlm_text: str
    llamacpp_text: str


@dataclass
class InteropReport:
    """Everything `check_interop` measured for one model."""

    model: str
    prompt_tokens: int
    logits: list[LogitsComparison] = field(default_factory=list)
    generation: list[GenerationComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def sample_prompt(model_dir: Path, tokenizer: Any, limit: int) -> list[int]:
    """A realistic prompt for a model: a held-out puzzle for a planning model, a line of Python for a text model."""
    from dreamlm.solver import TASK_FILE, Solver

    if (model_dir / TASK_FILE).is_file():
        from dreamlm.bench import TEST_SEED
        from dreamlm.tasks import make_examples

        solver = Solver(model_dir)
        puzzle = make_examples(solver.meta["task"], 1, TEST_SEED, "test")[0]["input"]
        return solver.prompt_ids(puzzle)
    ids = tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    return ids[: max(1, limit // 2)]


def compare_logits(llm: LlamaCppDream, model: Any, canvas: torch.Tensor, type: str) -> LogitsComparison:
    """dreamlm's and llama.cpp's logits of one canvas (1, N) with masks in it."""
    with torch.no_grad():
        ours = model(canvas)[0].double()  # (N, V), unshifted
    theirs = torch.from_numpy(llm.forward(canvas[0].tolist())).double()
    if theirs.shape != ours.shape:
        raise DreamError(f"llama.cpp gives logits of shape {tuple(theirs.shape)}, dreamlm {tuple(ours.shape)}")
    masked = (canvas[0] == model.config.mask_token_id).nonzero().flatten()
    a, b = ours[(masked - 1).clamp(min=0)], theirs[(masked - 1).clamp(min=0)]  # the rows that score the masks
    log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return LogitsComparison(type=type, file_mib=llm.path.stat().st_size / 2**20, canvas=canvas.shape[1],
                            masked=len(masked), max_abs_diff=float((ours - theirs).abs().max()),
                            max_abs_logit=float(ours.abs().max()),
                            argmax_agreement=float((a.argmax(-1) == b.argmax(-1)).double().mean()),
                            kl_mean=float(kl.mean()), kl_max=float(kl.max()))


def compare_generation(llm: LlamaCppDream, model: Any, prompt: torch.Tensor, new_tokens: int, type: str,
                       alg: str = "entropy", steps: int | None = None) -> GenerationComparison:
    """The same generation (greedy, `alg`, `steps`, one seed) with dreamlm's forwards and with llama.cpp's."""
    from dreamlm.sampling import diffusion_generate

    steps = steps or new_tokens
    ours = diffusion_generate(model, prompt, max_new_tokens=new_tokens, steps=steps, alg=alg, seed=0)
    theirs, _ = llamacpp_generate(llm, model, prompt, new_tokens, seed=0, steps=steps, alg=alg)
    n = prompt.shape[1]
    same = ours[0, n:] == theirs[0, n:]
    differ = (~same).nonzero().flatten()
    tok = model.tokenizer
    return GenerationComparison(type=type, alg=alg, steps=steps, new_tokens=new_tokens, tokens_agree=bool(same.all()),
                                agreement=float(same.double().mean()),
                                first_difference=int(differ[0]) + n if len(differ) else None,
                                dreamlm_text=tok.decode(ours[0, n:].tolist()),
                                llamacpp_text=tok.decode(theirs[0, n:].tolist()))


def _setup(model: str | Path, new_tokens: int | None) -> tuple[Any, str, torch.Tensor, torch.Tensor]:
    """(dreamlm model in float32, its label, prompt (1, P), a half-decoded canvas (1, P + new_tokens))."""
    from dreamlm.hub import model_label, resolve
    from dreamlm.model import DreamModel

    path = resolve(str(model))
    dream = DreamModel.from_pretrained(path, dtype=torch.float32).eval()
    if dream.tokenizer is None:
        raise DreamError(f"{path} has no tokenizer files")
    cfg = dream.config
    prompt_ids = sample_prompt(path, dream.tokenizer, cfg.context_length)
    if new_tokens is None:
        new_tokens = min(64, cfg.context_length - len(prompt_ids))
    if new_tokens < 1 or len(prompt_ids) + new_tokens > cfg.context_length:
        raise DreamError(f"the prompt ({len(prompt_ids)} tokens) + {new_tokens} new tokens must fit the model's "
                         f"context of {cfg.context_length}")
    prompt = torch.tensor([prompt_ids])
    # the prompt, then masks with some real tokens among them (a canvas part way through decoding)
    gen = torch.Generator().manual_seed(0)
    canvas = torch.cat([prompt, torch.full((1, new_tokens), cfg.mask_token_id)], dim=1)
    filled = torch.rand(new_tokens, generator=gen) < 0.3
    canvas[0, len(prompt_ids):][filled] = torch.randint(0, dream.tokenizer.vocab_size, (int(filled.sum()),),
                                                        generator=gen)
    return dream, model_label(path), prompt, canvas


def _check_file(report: InteropReport, dream: Any, prompt: torch.Tensor, canvas: torch.Tensor, file: Path,
                type: str, alg: str, generate: bool) -> None:
    with LlamaCppDream(file, canvas.shape[1]) as llm:
        if llm.mask_token_id != dream.config.mask_token_id:
            raise DreamError(f"llama.cpp reads mask token {llm.mask_token_id} from {file}, the model has "
                             f"{dream.config.mask_token_id}")
        report.logits.append(compare_logits(llm, dream, canvas, type))
        if generate:
            new_tokens = canvas.shape[1] - prompt.shape[1]
            report.generation.append(compare_generation(llm, dream, prompt, new_tokens, type, alg=alg))


def check_gguf(model: str | Path, file: str | Path, type: str, new_tokens: int | None = None,
               alg: str = "entropy", generate: bool = True) -> InteropReport:
    """Load an exported `file` (of `model`, at `type`) in llama.cpp; compare one masked forward with dreamlm's
    (float32) and one greedy generation (steps = new tokens) token for token."""
    require_llama_cpp()
    dream, label, prompt, canvas = _setup(model, new_tokens)
    report = InteropReport(model=label, prompt_tokens=prompt.shape[1])
    _check_file(report, dream, prompt, canvas, Path(file), type, alg, generate)
    return report


def check_interop(model: str | Path, types: Sequence[str] = ("f32", "q8_0"), new_tokens: int | None = None,
                  alg: str = "entropy", workdir: str | Path | None = None,
                  generate_types: Sequence[str] = ("f32", "q8_0")) -> InteropReport:
    """`check_gguf` for each of `types`, exported into a temporary folder; generations for `generate_types`."""
    from dreamlm.formats.gguf_export import check_type, export_model

    require_llama_cpp()
    for kind in types:
        check_type(kind)
    dream, label, prompt, canvas = _setup(model, new_tokens)
    report = InteropReport(model=label, prompt_tokens=prompt.shape[1])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for kind in types:
            file = export_model(str(model), Path(tmp) / f"model-{kind}.gguf", type=kind)
            _check_file(report, dream, prompt, canvas, file, kind, alg, kind in generate_types)
    return report


def interop_table(reports: Sequence[InteropReport]) -> str:
    """Markdown tables of interop reports."""
    lines = ["| model | GGUF | MiB | max abs logit diff | of max logit | argmax agreement | KL mean | KL max |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for c in r.logits:
            lines.append(f"| {r.model} | {c.type} | {c.file_mib:.2f} | {c.max_abs_diff:.2e} | {c.max_abs_logit:.1f} | "
                         f"{100 * c.argmax_agreement:.1f} % ({c.masked} masks) | {c.kl_mean:.2e} | {c.kl_max:.2e} |")
    lines += ["", "| model | GGUF | alg, steps | new tokens | tokens agree | agreement | first difference |",
              "|---|---|---|---|---|---|---|"]
    for r in reports:
        for g in r.generation:
            first = "—" if g.first_difference is None else str(g.first_difference)
            lines.append(f"| {r.model} | {g.type} | {g.alg}, {g.steps} | {g.new_tokens} | "
                         f"{'yes' if g.tokens_agree else 'no'} | {100 * g.agreement:.1f} % | {first} |")
    return "\n".join(lines)
