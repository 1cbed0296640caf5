"""TrainConfig: every setting of `dreamlm train`, read from a TOML file and `section.key=value` overrides.

Sections and keys (all optional except data.train):

[model]      init_from (Dream/Qwen2 dir to start from; "" = random init), tokenizer (dir with tokenizer files),
             char_alphabet (build a character tokenizer from these characters instead), char_words (extra
             whole-word tokens for it, "A..B" = the numbers A to B), hidden_size, layers,
             heads, kv_heads, intermediate_size (0 = 8/3·hidden rounded to 64), context (max positions; with
             init_from it only grows the checkpoint's rotary window, when data.seq_len needs it),
             tie_embeddings (share the input embedding and the output head), init_std (std of the random
             init of every weight matrix; 0.02 as HF Qwen2, larger helps narrow models leave the first plateau),
             compose_words (a char_words token made of other tokens, e.g. the edge `12>15`, starts as the sum of each
             part's own embedding turned by a fixed random rotation per position, so every edge into 15 shares
             a direction from the first step; a fresh init's words, or with init_from the words its
             checkpoint lacks). With init_from, a char tokenizer that differs from the checkpoint's (e.g.
             char_words grown) keeps every shared token's trained rows and starts the new ones fresh;
             length_tokens (add DreamOn's <|expand|> and <|delete|> to the model, mean-initialised rows)
[data]       stage ("pretrain": packed text/JSONL "text"; "sft": JSONL prompt/response, input/output or messages),
             train (list of files), valid (list of files), seq_len, chat (apply the chat template to prompts),
             separator (text appended to each prompt, e.g. "<|sep|>"), random_truncation (cut each SFT batch's
             padded tail at a random length), task (a planning task name, e.g. "sudoku4": the exported
             model then records it for `dreamlm solve`), view (the task's model view, e.g. "edges" for star
             graphs, "fixed" or "refs" for Countdown: training pairs are mapped through it and the solver reads puzzles the
             same way), fim_rate (AR pretraining only: the share of blocks rearranged into fill-in-the-middle form
             <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle at two random cut points, the
             fair AR baseline for infilling; the tokenizer needs the three sentinels), sft_mix (pretraining only:
             SFT JSONL files whose examples fill a share of every batch, Dream-SFT style: prompt kept clean, the
             response and the EOS padding after it maskable; data.chat applies the chat template to their prompts),
             sft_share (that share of each batch's rows, default 0.25)
[objective]  kind ("diffusion" or "ar"), weighting ("elbo" = 1/t, "linear", "cart", "none"), cart_p,
             focal_gamma (0 = off), focal_alpha, eps, span_rate (diffusion only: the share of training examples
             that mask one contiguous run of round(t * n) tokens instead of independent tokens, the shape of an
             infilling problem; 0 = Dream's objective; evaluation always uses independent masks), length_rate
             (diffusion only: the share of training examples given DreamOn's length-state augmentation, a middle
             span of up to length_max_middle tokens whose masked runs merge into <|expand|> targets with
             probability length_merge_p per pair, followed by 0..length_max_delete <|delete|> targets; needs
             model.length_tokens; 0 = off)
[optim]      lr, min_lr_ratio (cosine floor as a fraction of lr), weight_decay, beta1, beta2, warmup_steps,
             max_steps, batch_size (per process, per micro-step), grad_accum, clip (0 = off)
[run]        out_dir, seed, log_every, eval_every, eval_batches, eval_solve (planning runs: also solve this many
             held-out puzzles at each evaluation and log their accuracy, "val_acc"), save_every, keep_checkpoints,
             device ("auto", "cpu", "cuda"), compile, activation_checkpointing, export_dtype ("bfloat16", "float32",
             "float16"), export_format ("dream"; "qwen2" writes an AR run as a plain Qwen2ForCausalLM
             directory, the input `dreamlm convert` expects), progress (show the progress bar), stop_at (end the process after this step, as if interrupted;
             0 = never), rank_summaries (each rank writes its losses and a weight checksum: for tests),
             precision ("auto": bf16 autocast where the CPU/GPU multiplies bf16 natively, else fp32; "fp32"; "bf16":
             master weights, optimizer state, loss and metrics stay fp32 in every case), time_budget_s (> 0: time
             the first steps and lower optim.max_steps so the run ends within this many seconds of training; the
             schedule then follows the lowered max_steps, which the checkpoint keeps for an exact resume)
[adapter]    kind ("none" = train every weight; "lora": freeze the base, train low-rank updates of the target
             layers), rank, alpha, targets (linear layer names), train_norms (also train the RMSNorm weights),
             train_rows (input-embedding rows to train, e.g. a mask token the base never saw; "mask" = the
             model's mask token, "expand" / "delete" its length-state tokens), base (how the exported adapter names its base: a hub name or a path;
             "" = model.init_from), init (an adapter directory of the same rank to start from, e.g. to continue
             the shipped adapter). The export is then an adapter directory (PEFT's layout), not full weights
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamlm.errors import DreamError
from dreamlm.files import read_text


# Counts of steps (and keys measured in steps) are capped: 10**23 steps is a typo, not a run.
MAX_COUNT = 10**9
COUNTS = ("max_steps", "warmup_steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
          "eval_solve", "save_every", "keep_checkpoints", "stop_at")


@dataclass
class ModelSection:
    init_from: str = ""
    tokenizer: str = ""
    char_alphabet: str = ""
    char_words: list[str] = field(default_factory=list)
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate_size: int = 0
    context: int = 512
    tie_embeddings: bool = False
    init_std: float = 0.02
    compose_words: bool = False
    length_tokens: bool = False


@dataclass
class DataSection:
    stage: str = "pretrain"
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    seq_len: int = 256
    chat: bool = False
    separator: str = ""
    random_truncation: bool = False
    task: str = ""
    view: str = ""
    fim_rate: float = 0.0
    sft_mix: list[str] = field(default_factory=list)
    sft_share: float = 0.25


@dataclass
class ObjectiveSection:
    kind: str = "diffusion"
    weighting: str = "elbo"
    cart_p: float = 0.1
    focal_gamma: float = 0.0
    focal_alpha: float = 0.25
    eps: float = 1e-3
    span_rate: float = 0.0
    length_rate: float = 0.0
    length_max_delete: int = 16
    length_max_middle: int = 64
    length_merge_p: float = 0.5


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    clip: float = 1.0


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    eval_solve: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    export_dtype: str = "bfloat16"
    export_format: str = "dream"
    progress: bool = True
    stop_at: int = 0
    rank_summaries: bool = False
    precision: str = "auto"
    time_budget_s: float = 0.0


@dataclass
class AdapterSection:
    kind: str = "none"
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    train_norms: bool = True
    train_rows: list[str] = field(default_factory=lambda: ["mask"])
    base: str = ""
    init: str = ""


@dataclass
class TrainConfig:
    """All settings of one training run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Strict: an unknown section or key is an error naming it."""
        cfg = cls()
        for section, values in data.items():
            if section not in {f.name for f in dataclasses.fields(cls)}:
                raise DreamError(f"train config: unknown section [{section}]")
            if not isinstance(values, dict):
                raise DreamError(f"train config: [{section}] must be a table")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        """Read a TOML file (or start from defaults) and apply `section.key=value` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            text = read_text(path, "train config")
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise DreamError(f"train config {path} is not valid TOML: {exc}") from None
        cfg = cls.from_dict(data)
        for item in overrides or []:
            if "=" not in item:
                raise DreamError(f"override {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            cfg.set(key.strip(), raw, from_text=True)
        cfg.validate()
        return cfg

    def set(self, dotted: str, value: Any, from_text: bool = False) -> None:
        """Set `section.key`, converting and type-checking the value."""
        section_name, _, key = dotted.partition(".")
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise DreamError(f"train config: unknown section in {dotted!r}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise DreamError(f"train config: unknown key {dotted!r}")
        kind = typing.get_type_hints(type(section))[key]
        setattr(section, key, _convert(dotted, value, kind, from_text))

    def validate(self) -> None:
        """Check ranges and choices, with messages that name the key."""
        checks = [
            (self.data.stage in ("pretrain", "sft"), "data.stage must be 'pretrain' or 'sft'"),
            (self.objective.kind in ("diffusion", "ar"), "objective.kind must be 'diffusion' or 'ar'"),
            (bool(self.data.train), "data.train must list at least one file"),
            (self.data.seq_len >= 2, "data.seq_len must be >= 2"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
            (self.optim.max_steps >= 1, "optim.max_steps must be >= 1"),
            (self.optim.batch_size >= 1 and self.optim.grad_accum >= 1, "optim.batch_size and grad_accum must be >= 1"),
            (self.optim.warmup_steps >= 0 and self.optim.clip >= 0, "optim.warmup_steps and clip must be >= 0"),
            (self.run.log_every >= 1 and self.run.eval_every >= 1 and self.run.save_every >= 1,
             "run.log_every, eval_every and save_every must be >= 1"),
            (self.run.export_dtype in ("bfloat16", "float32", "float16"), "run.export_dtype must be a float dtype"),
            (self.run.export_format in ("dream", "qwen2"), "run.export_format must be 'dream' or 'qwen2'"),
            (self.run.export_format == "dream" or self.objective.kind == "ar",
             "run.export_format 'qwen2' is for AR runs (objective.kind = 'ar'); a diffusion model is Dream's format"),
            (0 <= self.data.fim_rate <= 1, "data.fim_rate must be in [0, 1]"),
            (0 < self.data.sft_share < 1, "data.sft_share must be in (0, 1)"),
            (not self.data.sft_mix or self.data.stage == "pretrain",
             "data.sft_mix adds SFT rows to packed pretraining blocks (data.stage = 'pretrain')"),
            (0 <= self.objective.span_rate <= 1, "objective.span_rate must be in [0, 1]"),
            (0 <= self.objective.length_rate <= 1, "objective.length_rate must be in [0, 1]"),
            (self.objective.length_rate == 0 or self.objective.kind == "diffusion",
             "objective.length_rate is for diffusion training (objective.kind = 'diffusion')"),
            (self.objective.length_max_delete >= 0, "objective.length_max_delete must be >= 0"),
            (self.objective.length_max_middle >= 1, "objective.length_max_middle must be >= 1"),
            (0 <= self.objective.length_merge_p < 1, "objective.length_merge_p must be in [0, 1)"),
            (self.objective.span_rate == 0 or self.objective.kind == "diffusion",
             "objective.span_rate is for diffusion training (objective.kind = 'diffusion')"),
            (self.data.fim_rate == 0 or (self.objective.kind == "ar" and self.data.stage == "pretrain"),
             "data.fim_rate is for AR pretraining (objective.kind = 'ar', data.stage = 'pretrain')"),
            (self.run.device in ("auto", "cpu", "cuda") or self.run.device.startswith("cuda:"),
             "run.device must be auto, cpu or cuda[:N]"),
            (self.model.hidden_size % max(self.model.heads, 1) == 0, "model.hidden_size must divide by model.heads"),
            (0 < self.model.init_std <= 1, "model.init_std must be in (0, 1]"),
            (self.run.eval_solve >= 0, "run.eval_solve must be >= 0"),
            (self.run.precision in ("auto", "fp32", "bf16"), "run.precision must be auto, fp32 or bf16"),
            (self.run.time_budget_s >= 0, "run.time_budget_s must be >= 0"),
            (self.adapter.kind in ("none", "lora"), "adapter.kind must be 'none' or 'lora'"),
            (self.adapter.kind == "none" or bool(self.model.init_from),
             "adapter.kind = 'lora' adapts a pretrained model: set model.init_from"),
            (self.adapter.rank >= 1 and self.adapter.alpha > 0, "adapter.rank must be >= 1 and adapter.alpha > 0"),
            (all(r in ("mask", "expand", "delete") or r.isdigit() for r in self.adapter.train_rows),
             "adapter.train_rows holds token ids, \"mask\", \"expand\" or \"delete\""),
            (not self.run.eval_solve or bool(self.data.task and self.data.valid),
             "run.eval_solve needs data.task and data.valid"),
            # ranges torch would only refuse with a traceback, or accept and train nothing / forever
            (0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1, "optim.beta1 and beta2 must be in [0, 1)"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1 (the latest is always kept)"),
            (self.run.stop_at >= 0, "run.stop_at must be >= 0 (0 = never stop early)"),
            (self.run.seed >= 0 and self.run.eval_batches >= 1, "run.seed must be >= 0 and run.eval_batches >= 1"),
            (min(self.model.hidden_size, self.model.layers, self.model.heads, self.model.kv_heads) >= 1
             and self.model.intermediate_size >= 0 and self.model.context >= 2,
             "model.hidden_size, layers, heads and kv_heads must be >= 1, intermediate_size >= 0, context >= 2"),
            (self.model.heads % max(self.model.kv_heads, 1) == 0, "model.heads must be a multiple of model.kv_heads"),
        ] + [(getattr(section, key) <= MAX_COUNT, f"{name}.{key} must be at most {MAX_COUNT:,} (more steps "
              "than any run takes)") for name, section in (("optim", self.optim), ("run", self.run))
             for key in COUNTS if hasattr(section, key)]
        for ok, message in checks:
            if not ok:
                raise DreamError(f"train config: {message}")
        if self.objective.kind == "diffusion":
            from dreamlm.training.objective import DiffusionObjective

            o = self.objective
            try:  # the loss's own checks, now rather than after the model is built
                DiffusionObjective(o.weighting, o.cart_p, o.focal_gamma, o.focal_alpha, o.eps)
            except DreamError as exc:
                raise DreamError(f"train config: objective.{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the run directory's record)."""
        return dataclasses.asdict(self)


def _convert(dotted: str, value: Any, kind: Any, from_text: bool) -> Any:
    try:
        if kind is bool:
            if from_text:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            number = int(value) if from_text else _exact(value, int)
            if abs(number) >= 2**63:  # torch seeds and counters are 64-bit
                raise DreamError(f"train config: {dotted}={value} is too large (integers must be below 2**63)")
            return number
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if kind is str:
            return str(value) if from_text else _exact(value, str)
        if typing.get_origin(kind) is list:
            if from_text:
                return _text_list(value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
    except DreamError:
        raise
    except (ValueError, TypeError, AttributeError):
        pass
    raise DreamError(f"train config: bad value {value!r} for {dotted}")


def _text_list(value: str) -> list[str]:
    """A --set list: `a,b` or TOML's `["a", "b"]` (a bracketed value is a list, never a glob; `[a, b]` unquoted
    is read as the names a and b)."""
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]")):
        return [v for v in value.split(",") if v]
    try:
        items = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        items = [v.strip().strip("'\"") for v in value[1:-1].split(",")]
    if not all(isinstance(v, str) for v in items):
        raise ValueError
    return [v for v in items if v]


def _exact(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise ValueError
    return value
