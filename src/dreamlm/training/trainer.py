"""The train loop: one loop for diffusion and AR, pretraining and SFT, one process or torchrun + FSDP2.

Exact resume: model, optimizer, step and data position are checkpointed; each example's noise (t and mask) is drawn
from a generator seeded by (seed, example index), so a resumed run — or the same global batch split over several
ranks — sees exactly the same noise. The loss is normalised by the masked-token count of the whole optimizer step
(all micro-batches, all ranks), so splitting a batch changes nothing but rounding.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.files import output_dir
from dreamlm.hub import resolve
from dreamlm.adapter import LoraSpec, add_lora, load_adapter_weights, save_adapter
from dreamlm.checkpoint import add_length_tokens, resolve_device
from dreamlm.model import DreamModel
from dreamlm.precision import training_precision
from dreamlm.tokenizer import DreamTokenizer
from dreamlm.training.config import TrainConfig
from dreamlm.training.data import (Batch, ExampleBatches, MixedBatches, PackedBlocks, char_tokenizer,
                                   check_data_files,
                                   read_examples, resolve_files)
from dreamlm.training.objective import (DiffusionObjective, LengthStates, LossOutput, ar_loss, augment_lengths,
                                        diffusion_loss, fit_length, mask_span, mask_tokens, sample_times)
from dreamlm.training.parallel import (World, all_reduce_sum, barrier, full_state, init_world, load_full_state,
                                       shard_model, shutdown)
from dreamlm.training.state import LATEST, checkpoint_root, load_training_checkpoint, save_training_checkpoint


@dataclass
class Noise:
    """The forward-process draw of one batch: t (B,) and masked (B, L)."""

    t: torch.Tensor
    masked: torch.Tensor
    x: torch.Tensor | None = None  # the clean targets when an augmentation changed them (length states), else None
    scale: torch.Tensor | None = None  # (B, L) weight multipliers, or None


def draw_noise(batch: Batch, seed: int, eps: float, mask_token_id: int, span_rate: float = 0.0,
               length_rate: float = 0.0, states: LengthStates | None = None, pad_id: int = 0) -> Noise:
    """Per-example t ~ U(eps, 1) and Bernoulli(t) masks, each from a generator seeded by the example's index; with
    span_rate > 0 that share of examples (drawn after, so span_rate 0 leaves every draw as it was) masks one
    contiguous run of the same size instead (objective.mask_span); with length_rate > 0 that share (drawn after
    that) is replaced by DreamOn's length-state augmentation of the row (objective.augment_lengths), cut or
    EOS-padded back to the block length."""
    ts, masks, xs, scales = [], [], [], []
    augmented_any = False
    for row in range(batch.x.shape[0]):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(batch.index[row]) * 2 + 1)
        t = sample_times(1, eps, gen)
        _, masked = mask_tokens(batch.x[row:row + 1], batch.maskable[row:row + 1], t, mask_token_id, gen)
        if span_rate > 0 and float(torch.rand(1, generator=gen)) < span_rate:
            masked = mask_span(batch.maskable[row:row + 1], t, gen)
        x, scale = batch.x[row:row + 1], torch.ones(1, batch.x.shape[1])
        if length_rate > 0 and float(torch.rand(1, generator=gen)) < length_rate:
            aug = augment_lengths(batch.x[row].tolist(), batch.maskable[row].tolist(), float(t), states, gen)
            z, m = fit_length(aug, batch.x.shape[1], pad_id)
            x, masked = z[None], m[None]
            deletes = (z == states.delete_id) & m
            if bool(deletes.any()):
                scale[0, deletes] = 1.0 / int(deletes.sum())
            augmented_any = True
        ts.append(t)
        masks.append(masked)
        xs.append(x)
        scales.append(scale)
    if not augmented_any:
        return Noise(torch.cat(ts), torch.cat(masks))
    return Noise(torch.cat(ts), torch.cat(masks), torch.cat(xs), torch.cat(scales))


def lora_spec(cfg: TrainConfig, config: DreamConfig) -> LoraSpec:
    """The run's LoRA settings, with "mask" in adapter.train_rows read as the model's mask token id."""
    a = cfg.adapter
    named = {"mask": config.mask_token_id, "expand": config.expand_token_id, "delete": config.delete_token_id}
    rows = [named[r] if r in named else int(r) for r in a.train_rows]
    return LoraSpec(a.rank, a.alpha, list(a.targets), a.train_norms, [r for r in rows if r is not None])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_tokenizer(cfg: TrainConfig) -> DreamTokenizer:
    """The run's tokenizer: from init_from, model.tokenizer, or a character alphabet."""
    m = cfg.model
    if m.char_alphabet:
        return char_tokenizer(m.char_alphabet, m.char_words)
    source = m.tokenizer or (resolve(m.init_from) if m.init_from else "")  # init_from may be a model name
    if not m.tokenizer and m.init_from:
        from dreamlm.adapter import is_adapter_dir
        from dreamlm.checkpoint import adapter_base

        if is_adapter_dir(Path(source)):  # a base + adapter model (e.g. smollm2): the base holds the tokenizer
            source = adapter_base(Path(source))
    if not source:
        raise DreamError("train config: set model.tokenizer (a directory), model.char_alphabet or model.init_from")
    return DreamTokenizer.from_pretrained(source)


def build_model(cfg: TrainConfig, tokenizer: DreamTokenizer) -> DreamModel:
    """A fresh model (seeded init) or the init_from checkpoint, causal for the AR objective."""
    causal = cfg.objective.kind == "ar"
    if cfg.model.init_from:
        model = DreamModel.from_pretrained(resolve(cfg.model.init_from), dtype=torch.float32, causal=causal)
        model.config.causal = causal
        if model.tokenizer is not None:
            adapt_vocabulary(model, model.tokenizer, tokenizer, cfg)
        if cfg.model.length_tokens:
            add_length_tokens(model, tokenizer)
        check_memory(cfg, model.config)
    else:
        m = cfg.model
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        inter = m.intermediate_size or int(round(m.hidden_size * 8 / 3 / 64)) * 64
        vocab = ((tokenizer.vocab_size + 7) // 8) * 8
        config = DreamConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=inter,
                             num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                             max_position_embeddings=m.context, rope_theta=10000.0, max_window_layers=m.layers,
                             mask_token_id=tokenizer.mask_token_id, pad_token_id=pad, bos_token_id=eos,
                             eos_token_id=eos, causal=causal,
                             tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std)
        check_memory(cfg, config)  # before the weights are allocated
        torch.manual_seed(cfg.run.seed)
        model = DreamModel(config).init_weights(cfg.run.seed)
        if m.compose_words and not compose_word_embeddings(model, tokenizer, cfg.run.seed):
            raise DreamError("model.compose_words: no char_words token is made of other tokens (e.g. the edges "
                             "\"10..18>10..18\" with the names \"10..18\")")
    if cfg.objective.length_rate > 0 and not model.config.length_states:
        raise DreamError("objective.length_rate needs the <|expand|> and <|delete|> tokens: set "
                         "model.length_tokens = true (adds them to the init_from model)")
    if cfg.objective.kind == "diffusion" and model.config.mask_token_id is None:
        raise DreamError("diffusion training needs a mask token: run `dreamlm convert` on the AR checkpoint first")
    if cfg.data.task:
        from dreamlm.tasks import get_task

        get_task(cfg.data.task)  # an unknown name fails now, not after training
    if cfg.data.view:
        view_of(cfg)  # so does an unknown view
    if cfg.model.init_from and cfg.data.seq_len <= cfg.model.context and cfg.data.seq_len > model.config.context_length:
        # Rotary positions are computed, not learned: an init_from model's window grows to model.context when the
        # data needs it (its weights have never seen the new positions; the run teaches them).
        model.config.max_position_embeddings = cfg.model.context
    if cfg.data.seq_len > model.config.max_position_embeddings:
        raise DreamError(f"data.seq_len={cfg.data.seq_len} exceeds the model's {model.config.max_position_embeddings} "
                         "positions")
    model.tokenizer = tokenizer
    return model


def memory_floor(cfg: TrainConfig, config: DreamConfig) -> int:
    """Bytes one training process needs at the least: fp32 weights, gradients and AdamW's two moments (16 bytes
    per parameter, split over the ranks of an FSDP run) plus one micro-batch's fp32 logits (batch_size x seq_len
    x vocab x 4). Activations come on top: a run over this floor can never fit."""
    c = config
    width = c.num_attention_heads * c.dim_per_head
    layer = 2 * c.hidden_size * width + 2 * c.hidden_size * c.num_key_value_heads * c.dim_per_head \
        + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    params = c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    return params * 16 // world + cfg.optim.batch_size * cfg.data.seq_len * c.vocab_size * 4


def device_memory(device: str) -> tuple[str, int]:
    """(name, total bytes) of the memory a run on `device` ("auto", "cpu", "cuda[:N]") computes in."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = int(os.environ.get("LOCAL_RANK", "0")) if index is None else index
        return f"GPU {index}", torch.cuda.get_device_properties(index).total_memory
    return "this machine's RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: TrainConfig, config: DreamConfig) -> None:
    """DreamError, before anything is allocated, when the run's memory floor exceeds the device's memory."""
    need = memory_floor(cfg, config)
    where, have = device_memory(cfg.run.device)
    if need > have:
        raise DreamError(
            f"train config: this run needs at least {need / 2**30:,.1f} GiB ({config.hidden_size}-wide model at 16 "
            f"bytes per parameter for weights, gradients and AdamW, plus the fp32 logits of optim.batch_size="
            f"{cfg.optim.batch_size} x data.seq_len={cfg.data.seq_len} x vocab {config.vocab_size}), more than "
            f"{where} ({have / 2**30:,.1f} GiB); lower optim.batch_size (raise optim.grad_accum for the same batch) "
            "or the model size")


def adapt_vocabulary(model: DreamModel, old: DreamTokenizer, new: DreamTokenizer, cfg: TrainConfig) -> int:
    """Give an init_from model the rows of the run's tokenizer when its own differs (e.g. char_words grown from
    "10..30" to "10..50"): every token both know keeps its trained input-embedding and output-head rows (matched by
    text, wherever its id moved); a new one starts random (std model.init_std), and with model.compose_words a new
    compound word starts as the composition of its parts. Returns how many tokens are new; DreamError if a special
    token (mask, pad, EOS, BOS) would change its id."""
    old_ids = {old.id_to_token(i): i for i in range(old.vocab_size)}
    if old.vocab_size == new.vocab_size and all(old_ids.get(new.id_to_token(i)) == i for i in range(new.vocab_size)):
        return 0
    config = model.config
    for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        token_id = getattr(config, name)
        if token_id is not None and old.id_to_token(token_id) != new.id_to_token(token_id):
            raise DreamError(f"model.init_from: the run's tokenizer moves {name} ({old.id_to_token(token_id)!r} at "
                             f"{token_id}); it can only add or reorder ordinary tokens")
    size, width = ((new.vocab_size + 7) // 8) * 8, config.hidden_size
    gen = torch.Generator().manual_seed(cfg.run.seed)
    embed = torch.randn(size, width, generator=gen) * cfg.model.init_std
    head = torch.randn(size, width, generator=gen) * cfg.model.init_std
    fresh = []
    with torch.no_grad():
        for token_id in range(new.vocab_size):
            source = old_ids.get(new.id_to_token(token_id))
            if source is None:
                fresh.append(token_id)
                continue
            embed[token_id] = model.model.embed_tokens.weight[source]
            head[token_id] = model.lm_head.weight[source]
    model.model.embed_tokens = torch.nn.Embedding(size, width, _weight=embed)
    model.lm_head = torch.nn.Linear(width, size, bias=False)
    model.lm_head.weight = model.model.embed_tokens.weight if config.tie_word_embeddings else torch.nn.Parameter(head)
    config.vocab_size = size
    if cfg.model.compose_words:
        compose_word_embeddings(model, new, cfg.run.seed, only=set(fresh))
    return len(fresh)


def compose_word_embeddings(model: DreamModel, tokenizer: DreamTokenizer, seed: int,
                            only: set[int] | None = None) -> int:
    """Re-initialise the input embedding of every compound word token (digits and single separators, e.g. the edge
    `12>15` → parts `12`, `>`, `15`) as Σ_i R_i·e(part_i)/√k: each part's own token embedding turned by a fixed
    random rotation R_i per position, so `a>b` and `b>a` differ while every edge into 15 carries the same R_2·e(15)
    — one linear map finds an edge by either end, for all names at once. Returns how many rows it set (`only`:
    just these ids, e.g. the new tokens of a grown vocabulary). The table stays a plain embedding (the checkpoint
    format is unchanged)."""
    gen = torch.Generator().manual_seed(seed + 1)
    table = model.model.embed_tokens.weight
    width = table.shape[1]
    rotations: dict[int, torch.Tensor] = {}
    done = 0
    specials = tokenizer.special_tokens()
    with torch.no_grad():
        base = table.detach().float().clone()
        for token_id in range(tokenizer.vocab_size):
            word = tokenizer.id_to_token(token_id) or ""
            parts = re.findall(r"\d+|\D", word)
            ids = [tokenizer.token_to_id(part) for part in parts]
            if word in specials or len(parts) < 2 or None in ids or (only is not None and token_id not in only):
                continue
            row = torch.zeros(width)
            for i, part_id in enumerate(ids):
                if i not in rotations:
                    rotations[i] = torch.linalg.qr(torch.randn(width, width, generator=gen))[0]
                row += rotations[i] @ base[part_id]
            table[token_id] = (row / len(parts) ** 0.5).to(table.dtype)
            done += 1
    return done


def view_of(cfg: TrainConfig):
    """(input, output) → the pair as a model with the config's task view is trained on it."""
    from dreamlm.tasks import get_task

    if not cfg.data.task:
        raise DreamError("train config: data.view needs data.task (the task whose view it is)")
    task, view = get_task(cfg.data.task), cfg.data.view
    task.check_view(view)
    return lambda text_in, text_out: task.training_pair(text_in, text_out, view)


def training_star_shapes(cfg: TrainConfig) -> list[tuple[int, int]]:
    """The shapes (d, l) of the star graphs in a star-graph run's training files ([] for other tasks)."""
    if not cfg.data.task.startswith("star-"):
        return []
    from dreamlm.tasks import stargraph

    shapes = set()
    for path in resolve_files(cfg.data.train):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    edges, centre, _ = stargraph.parse_input(json.loads(line)["input"])
                    shapes.add(stargraph.shape(edges, centre))
    return sorted(shapes)


def build_source(cfg: TrainConfig, tokenizer: DreamTokenizer, files: list[str], world: World, seed: int,
                 pad_token_id: int, fim_rate: float = 0.0, mix: bool = False):
    """The batch source for a list of files (packed blocks or SFT examples); fim_rate and the SFT mix (`mix`) for
    training blocks only (validation stays plain text, so the validation loss is comparable with a run without
    them)."""
    paths = resolve_files(files)
    if cfg.data.stage == "pretrain":
        blocks = PackedBlocks(paths, tokenizer, cfg.data.seq_len, seed, world.rank, world.size, fim_rate)
        if not (mix and cfg.data.sft_mix):
            return blocks
        examples = [e for p in resolve_files(cfg.data.sft_mix)
                    for e in read_examples(p, tokenizer, cfg.data.chat, cfg.data.separator)]
        extra = ExampleBatches(examples, cfg.data.seq_len, pad_token_id, seed + 7, False, world.rank, world.size)
        return MixedBatches(blocks, extra, cfg.data.sft_share)
    transform = view_of(cfg) if cfg.data.view else None
    examples = [e for p in paths for e in read_examples(p, tokenizer, cfg.data.chat, cfg.data.separator, transform)]
    return ExampleBatches(examples, cfg.data.seq_len, pad_token_id, seed, cfg.data.random_truncation,
                          world.rank, world.size)


def log_metrics(run: Any, record: dict) -> None:
    """Keep a metrics record in `run.history` and append it to metrics.jsonl (main process only): the log of a
    training run and of an RL run alike."""
    run.history.append(record)
    if run.world.main:
        run.out.mkdir(parents=True, exist_ok=True)
        with (run.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def open_run(run: Any, resume: bool, config_name: str) -> int:
    """The start of `fit` for a training run and an RL run alike: continue from the latest checkpoint (`resume`) or
    refuse to write over an existing run, save the config as `config_name`, and return the last step to run to."""
    cfg = run.cfg
    if resume and not run.resume():
        raise DreamError(f"--resume: {run.out} holds no checkpoint to continue; drop --resume to start a new run")
    if not resume and (run.out / "checkpoints").exists():
        raise DreamError(f"{run.out} already holds a run; pass --resume to continue it or choose another out_dir")
    if run.world.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / config_name).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg.optim.max_steps if not cfg.run.stop_at else min(cfg.run.stop_at, cfg.optim.max_steps)


class Trainer:
    """Holds the pieces of a run; `fit()` runs it."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        # what a user can get wrong fails here, in one line, before the model is built or any data is read
        self.out = output_dir(Path(cfg.run.out_dir))
        if cfg.run.device != "auto":
            resolve_device(cfg.run.device)
        for files in (cfg.data.train, cfg.data.valid):
            if files:
                check_data_files(resolve_files(files))
        self.world = init_world(cfg.run.device)
        self.tokenizer = build_tokenizer(cfg)
        model = build_model(cfg, self.tokenizer)
        self.model_config = model.config
        model.activation_checkpointing = cfg.run.activation_checkpointing
        self.lora = lora_spec(cfg, model.config) if cfg.adapter.kind == "lora" else None
        if self.lora is not None:
            add_lora(model, self.lora, cfg.run.seed)
            if cfg.adapter.init:
                load_adapter_weights(model, resolve(cfg.adapter.init))
        model.to(self.world.device).train()
        self.precision = training_precision(cfg.run.precision, self.world.device)
        if self.world.main:
            print(self.precision.describe(), file=sys.stderr)
        # FSDP2 on a GPU casts parameters itself (its mixed-precision policy); everywhere else bf16 is an autocast
        fsdp_casts = self.world.distributed and self.world.device.type == "cuda"
        self.model = shard_model(model, self.world, cfg.run.compile,
                                 self.precision.dtype if fsdp_casts else torch.float32)
        self.autocast = None if fsdp_casts else self.precision.autocast(self.world.device)
        self.objective = DiffusionObjective(cfg.objective.weighting, cfg.objective.cart_p, cfg.objective.focal_gamma,
                                            cfg.objective.focal_alpha, cfg.objective.eps)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.lora is not None:  # only the low-rank pairs decay; norms and embedding rows must not drift
            decay = [p for n, p in trainable if ".lora_" in n]
            no_decay = [p for n, p in trainable if ".lora_" not in n]
        else:
            decay = [p for n, p in trainable if p.dim() >= 2]
            no_decay = [p for n, p in trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            fused=self.world.device.type == "cuda")
        pad = self.model_config.pad_token_id if self.model_config.pad_token_id is not None else 0
        self.train_source = build_source(cfg, self.tokenizer, cfg.data.train, self.world, cfg.run.seed, pad,
                                         cfg.data.fim_rate, mix=True)
        self.valid_files = cfg.data.valid
        self.pad = pad
        self.step = 0
        self.budget_done = False
        self.history: list[dict] = []

    # ---- one optimizer step --------------------------------------------------------------------------------
    def _loss(self, batch: Batch, noise: Noise | None, denominator: float) -> LossOutput:
        x = batch.x.to(self.world.device)
        if self.cfg.objective.kind == "ar":
            return ar_loss(self.model, x, batch.ar_targets.to(self.world.device), denominator)
        if noise.x is not None:
            x = noise.x.to(self.world.device)
        return diffusion_loss(self.model, x, batch.maskable.to(self.world.device), self.objective,
                              noise.t, noise.masked.to(self.world.device), denominator, noise.scale)

    def _noise(self, batch: Batch, train: bool = True) -> Noise | None:
        """The batch's forward-process draw; evaluation always uses independent masks (the plain objective)."""
        if self.cfg.objective.kind == "ar":
            return None
        o, c = self.cfg.objective, self.model_config
        states = None
        if o.length_rate > 0:
            states = LengthStates(c.mask_token_id, c.expand_token_id, c.delete_token_id, o.length_max_delete,
                                  o.length_max_middle, o.length_merge_p)
        return draw_noise(batch, self.cfg.run.seed, o.eps, c.mask_token_id, o.span_rate if train else 0.0,
                          o.length_rate if train else 0.0, states, self.pad)

    def _count(self, batch: Batch, noise: Noise | None) -> int:
        return int(batch.ar_targets.sum()) if noise is None else int(noise.masked.sum())

    def train_step(self) -> dict:
        """Gradient accumulation over micro-batches, clip, AdamW; returns the step's metrics."""
        cfg = self.cfg
        micro = [self.train_source.next_batch(cfg.optim.batch_size) for _ in range(cfg.optim.grad_accum)]
        noises = [self._noise(b) for b in micro]
        local = sum(self._count(b, n) for b, n in zip(micro, noises))
        (total_count,) = all_reduce_sum([float(local)], self.world)
        # FSDP averages gradients over ranks; dividing by count/world makes the result Σ CE / global count
        denominator = max(total_count, 1.0) / self.world.size
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        weighted = 0.0
        for batch, noise in zip(micro, noises):
            # every rank runs every micro-batch, even one with nothing masked (its loss is 0): under FSDP a rank
            # that skipped its forward/backward would leave the others waiting in a collective
            with self.autocast or nullcontext():
                out = self._loss(batch, noise, denominator)
            out.loss.backward()
            weighted += float(out.weighted_sum)
        grad_norm = float("nan")
        if cfg.optim.clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (weighted_total,) = all_reduce_sum([weighted], self.world)
        tokens = sum(b.x.numel() for b in micro) * self.world.size
        self.step += 1
        return {"step": self.step, "loss": weighted_total / max(total_count, 1.0), "lr": lr,
                "grad_norm": grad_norm, "tokens": tokens}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over `eval_batches` fixed held-out batches (same noise every time)."""
        if not self.valid_files:
            return None
        source = build_source(self.cfg, self.tokenizer, self.valid_files, self.world, self.cfg.run.seed + 1, self.pad)
        self.model.eval()
        weighted, count = 0.0, 0.0
        for _ in range(self.cfg.run.eval_batches):
            batch = source.next_batch(self.cfg.optim.batch_size)
            noise = self._noise(batch, train=False)
            with self.autocast or nullcontext():  # never skipped, for the same reason as in train_step
                weighted += float(self._loss(batch, noise, 1.0).weighted_sum)
            count += self._count(batch, noise)
        self.model.train()
        weighted, count = all_reduce_sum([weighted, count], self.world)
        return weighted / max(count, 1.0)

    @torch.no_grad()
    def evaluate_solve(self) -> float | None:
        """Share of the first `eval_solve` held-out puzzles that the model solves (rules checked), or None."""
        n = self.cfg.run.eval_solve
        if not n or self.world.distributed:  # sharded weights: solving needs the whole model on one process
            return None
        from dreamlm.solver import Solver

        puzzles: list[str] = []
        for path in resolve_files(self.valid_files):
            with path.open(encoding="utf-8") as fh:
                puzzles += [json.loads(line)["input"] for line in fh if line.strip()]
        puzzles = puzzles[:n]
        if not puzzles:
            return None
        model = self.model
        model.tokenizer = self.tokenizer
        solver = Solver.from_model(model, self.cfg.data.task, self.cfg.data.seq_len, self.cfg.data.separator,
                                   self.cfg.data.view)
        model.eval()
        try:
            solved = sum(s.valid for s in solver.solve(puzzles))
        finally:
            model.train()
        return solved / len(puzzles)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint model, optimizer, step, data position and RNG (rank 0 writes)."""
        model_state, optim_state = full_state(self.model, self.optimizer, self.world)
        if self.world.main:
            trainer_state = {"step": self.step, "optimizer": optim_state, "data": self.train_source.state_dict(),
                             "torch_rng": torch.get_rng_state(), "history": json.dumps(self.history),
                             "max_steps": self.cfg.optim.max_steps, "precision": self.precision.name}
            save_training_checkpoint(self.out, self.step, model_state, trainer_state,
                                     {"config": self.cfg.to_dict(), "step": self.step}, self.cfg.run.keep_checkpoints)
        barrier(self.world)

    def resume(self) -> bool:
        """Load the latest checkpoint of out_dir; False if there is none."""
        loaded = load_training_checkpoint(self.out)
        if loaded is None:
            return False
        model_state, state = loaded
        try:
            load_full_state(self.model, self.optimizer, model_state, state["optimizer"], self.world)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
            raise DreamError(f"the checkpoint in {self.out} does not fit this config's model (was the model "
                             f"changed since?); resume with the run's own config or choose a new out_dir ({first})"
                             ) from None
        self.step = int(state["step"])
        if "max_steps" in state:  # a time budget may have lowered it: the schedule must stay the run's own
            self.cfg.optim.max_steps = int(state["max_steps"])
            self.budget_done = True
        if state.get("precision", self.precision.name) != self.precision.name and self.world.main:
            print(f"note: this run was trained in {state['precision']} and resumes in {self.precision.name}; "
                  "the continuation is not bit-exact with an uninterrupted run", file=sys.stderr)
        self.train_source.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])
        return True

    def export(self) -> Path:
        """Write the final model as a Dream-format directory with its tokenizer, or the adapter directory of a LoRA
        run (rank 0)."""
        model_state, _ = full_state(self.model, None, self.world)
        path = self.out / "final"
        if self.world.main and self.lora is not None:
            with torch.device("meta"):
                plain = DreamModel(self.model_config)
            add_lora(plain, self.lora)
            plain.load_state_dict(model_state, assign=True)
            save_adapter(plain, self.lora, path, self.cfg.adapter.base or self.cfg.model.init_from)
        elif self.world.main:
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
                self.cfg.run.export_dtype]
            config = self.model_config
            if self.cfg.run.export_format == "qwen2":
                config = dataclasses.replace(config, model_type="qwen2", causal=True, mask_token_id=None)
            with torch.device("meta"):
                plain = DreamModel(config)
            plain.load_state_dict(model_state, assign=True)
            plain.to(dtype).save_pretrained(path, tokenizer=self.tokenizer)
            if self.cfg.data.task:
                from dreamlm.solver import write_task_file

                write_task_file(path, self.cfg.data.task, self.cfg.data.seq_len, self.cfg.data.separator,
                                "dreamlm " + " ".join(sys.argv[1:]) if sys.argv else "", self.cfg.data.view,
                                training_star_shapes(self.cfg))
        barrier(self.world)
        return path

    # ---- the run -------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        log_metrics(self, record)

    def fit(self, resume: bool = False) -> Path | None:
        """Train to max_steps (or stop_at), logging, evaluating and checkpointing; export at the end."""
        cfg = self.cfg
        last = open_run(self, resume, "train_config.json")
        progress = _Progress(cfg.run.progress and self.world.main, self.step, cfg.optim.max_steps)
        start_time, tokens_since, window_start = time.perf_counter(), 0, time.perf_counter()
        losses: list[float] = []
        probe = (self.step + 3, self.step + 13) if cfg.run.time_budget_s > 0 and not self.budget_done else None
        try:
            while self.step < last:
                if probe is not None and self.step == probe[0]:
                    probe_start = time.perf_counter()
                metrics = self.train_step()
                if probe is not None and self.step == probe[1]:
                    last = self._fit_budget((time.perf_counter() - probe_start) / (probe[1] - probe[0]),
                                            time.perf_counter() - start_time)
                    progress.total(cfg.optim.max_steps)
                    probe = None
                if not math.isfinite(metrics["loss"]):
                    raise DreamError(f"the loss is {metrics['loss']} at step {self.step}: training diverged (lower "
                                     "optim.lr, or check the data); nothing exported, the last checkpoint is kept")
                losses.append(metrics["loss"])
                tokens_since += metrics["tokens"]
                if self.step % cfg.run.log_every == 0 or self.step == last:
                    now = time.perf_counter()
                    metrics["tok_per_s"] = tokens_since / max(now - window_start, 1e-9)
                    metrics["elapsed"] = now - start_time
                    self._log(metrics)
                    tokens_since, window_start = 0, now
                    progress.update(self.step, metrics)
                if self.step % cfg.run.eval_every == 0 or self.step == cfg.optim.max_steps:
                    val = self.evaluate()
                    if val is not None:
                        self._log({"step": self.step, "val_loss": val})
                        progress.note(f"step {self.step}: val_loss {val:.4f}")
                    acc = self.evaluate_solve()
                    if acc is not None:
                        self._log({"step": self.step, "val_acc": acc})
                        progress.note(f"step {self.step}: val_acc {acc:.3f}")
                if self.step % cfg.run.save_every == 0 or self.step == last:
                    self.save()
        finally:
            progress.close()
        if cfg.run.rank_summaries:
            self._rank_summary(losses)
        if self.step < cfg.optim.max_steps:
            shutdown(self.world)
            return None
        path = self.export()
        if self.world.main:
            plot_losses(self.history, self.out / "loss.png")
        shutdown(self.world)
        return path

    def _fit_budget(self, step_seconds: float, spent: float) -> int:
        """Lower optim.max_steps so the run's training ends within run.time_budget_s (evaluations counted in by a
        10 % margin); returns the new last step. Every rank takes rank 0's number."""
        cfg = self.cfg
        left = max(cfg.run.time_budget_s - spent, 0.0) * 0.9
        steps = self.step + max(1, int(left / max(step_seconds, 1e-9)))
        (steps,) = all_reduce_sum([float(steps) if self.world.main else 0.0], self.world)
        cfg.optim.max_steps = min(cfg.optim.max_steps, max(int(steps), self.step + 1))
        self.budget_done = True
        if self.world.main:
            print(f"time budget {cfg.run.time_budget_s:.0f} s: {step_seconds * 1000:.0f} ms a step, so "
                  f"optim.max_steps = {cfg.optim.max_steps}", file=sys.stderr)
        return cfg.optim.max_steps if not cfg.run.stop_at else min(cfg.run.stop_at, cfg.optim.max_steps)

    def _rank_summary(self, losses: list[float]) -> None:
        state, _ = full_state(self.model, None, self.world, everywhere=True)
        checksum = sum(float(v.double().sum()) for v in state.values())
        (self.out / f"rank_summary-{self.world.rank}.json").write_text(
            json.dumps({"rank": self.world.rank, "losses": losses, "checksum": checksum}))


class _Progress:
    """A rich progress bar with loss, tokens/s, lr and ETA (nothing when disabled)."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, m: dict) -> None:
        if self.bar is not None:
            info = f"loss {m['loss']:.4f} · {m['tok_per_s']:.0f} tok/s · lr {m['lr']:.2e}"
            self.bar.update(self.task, completed=step, info=info)

    def total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def plot_losses(history: list[dict], path: Path) -> None:
    """Loss (and validation loss) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(cfg: TrainConfig, resume: bool = False) -> Path | None:
    """Run training; returns the exported model directory (None when stopped early by run.stop_at)."""
    root = checkpoint_root(cfg.run.out_dir)
    if resume and not (root / LATEST).is_file():  # said now, not after the data is read and the model built
        raise DreamError(f"--resume: {cfg.run.out_dir} holds no checkpoint to continue; drop --resume to start a "
                         "new run")
    if not resume and root.exists():
        raise DreamError(f"{cfg.run.out_dir} already holds a run; pass --resume to continue it or choose another "
                         "out_dir")
    return Trainer(cfg).fit(resume=resume)
