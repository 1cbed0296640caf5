"""The lm-evaluation-harness model class `dreamlm`: any Dream-format checkpoint, with Dream's evaluation semantics.

- `generate_until`: the step machine (`plan` + `advance`), one `DecodeState` per request, batched `batch_size` at a
  time (left-padded inside `advance`; a row gives what it gives alone). Defaults are those of Dream's harness: 128
  new tokens, 128 steps, `entropy`, temperature 0, top_p None, no BOS added. A task's `max_gen_toks` is honoured; the
  output is cut at EOS and at the first stop sequence. A context holding `<|mask|>`/`<|mask:N|>` spans is an infill
  template (the spans are filled, their text returned). Planning models (a `dreamlm_task.json` beside the weights)
  answer through their `Solver`, exactly as `dreamlm solve` does.
- `loglikelihood`: `mc_elbo` (Monte-Carlo ELBO) and `greedy_match` over context + continuation + EOS.
- `loglikelihood_rolling`: refused (a masked-diffusion model has no left-to-right factorisation to roll).
- Data parallel: under `torchrun`/`accelerate launch` (WORLD_SIZE > 1) a gloo/nccl process group is joined;
  lm-eval then gives each rank every WORLD_SIZE-th document and gathers the results on rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dreamlm.errors import DreamError
from dreamlm.hub import require_model_dir
from dreamlm.eval.likelihood import greedy_match, mc_elbo, request_seed
from dreamlm.model import DreamModel
from dreamlm.precision import inference_precision
from dreamlm.sampling import SamplerOptions, advance, cut_at_eos, parse_template, plan
from dreamlm.sampling.generate import Constraints
from dreamlm.sampling.infill import MASK_SPAN, apply_stop, unwritable_ids
from dreamlm.solver import TASK_FILE, Solver


def _flag(value: Any) -> bool:
    """A boolean model argument given as a bool or as the strings lm-eval passes."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in {"true", "1", "yes"}:
        return True
    if str(value).lower() in {"false", "0", "no"}:
        return False
    raise DreamError(f"expected true or false, got {value!r}")


def _optional(value: Any, kind: type) -> Any:
    """None for None/'none'/'', else `kind(value)`."""
    return None if value is None or str(value).lower() in {"none", ""} else kind(value)


def cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop sequence."""
    return apply_stop(text, until)[0]


@register_model("dreamlm")
class DreamLM(LM):
    """lm-eval model over a Dream-format checkpoint directory (`pretrained=DIR`); see the module docstring."""

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None,
                 dtype: str = "float32", max_new_tokens: int = 128, diffusion_steps: int | None = None,
                 alg: str = "entropy", temperature: float = 0.0, top_p: float | None = None,
                 top_k: int | None = None, alg_temp: float | None = 0.0, eps: float = 1e-3,
                 add_bos_token: bool = False, mc_num: int = 128, mc_batch_size: int = 32, sampling_eps: float = 1e-3,
                 keep_last: bool = True, check_greedy: bool = True, seed: int = 0, block_length: int | None = None,
                 cache: str = "none", threshold: float | None = None, stop_at_eos: bool = False,
                 **ignored: Any) -> None:
        super().__init__()
        unknown = sorted(k for k in ignored if k not in {"max_batch_size"})
        if unknown:
            raise DreamError(f"unknown dreamlm model argument {unknown[0]!r}")
        path = require_model_dir(Path(str(pretrained)))
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise DreamError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise DreamError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.steps = _optional(diffusion_steps, int)  # None: one step per new token (Dream: 128 for 128)
        if self.steps is not None and self.steps < 1:  # 0 would silently mean "the default"
            raise DreamError(f"diffusion_steps must be >= 1, got {diffusion_steps}")
        self.sampler = dict(eps=float(eps), temperature=float(temperature), top_p=_optional(top_p, float),
                            top_k=_optional(top_k, int), alg=str(alg), alg_temp=_optional(alg_temp, float),
                            block_length=_optional(block_length, int), cache=str(cache),
                            threshold=_optional(threshold, float), stop_at_eos=_flag(stop_at_eos))
        SamplerOptions(steps=self.steps or self.max_new_tokens, **self.sampler)  # refuse bad options now
        self.add_bos_token, self.keep_last, self.check_greedy = _flag(add_bos_token), _flag(keep_last), \
            _flag(check_greedy)
        self.mc_num, self.mc_batch_size, self.sampling_eps = int(mc_num), int(mc_batch_size), float(sampling_eps)
        if self.mc_num < 1 or self.mc_batch_size < 1 or not 0 < self.sampling_eps < 1:
            raise DreamError("mc_num and mc_batch_size must be >= 1 and sampling_eps in (0, 1)")
        self.seed = int(seed)
        self._rank, self._world_size = _join_process_group()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise DreamError(f"device {device!r} asked for, but this machine has no CUDA; pass device cpu "
                             "(lm_eval's CLI defaults to cuda: add --device cpu)")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        weights = inference_precision("auto", device or "cpu").dtype if str(dtype) == "auto" else dtype
        self.solver = Solver(path, device=device, dtype=weights) if (path / TASK_FILE).is_file() else None
        self.model = self.solver.model if self.solver else DreamModel.from_pretrained(path, dtype=weights,
                                                                                       device=device)
        self.model.eval()
        self._device = self.model.device
        self.tok = self.model.tokenizer
        if self.tok is None:
            raise DreamError(f"{path} has no tokenizer files")
        self.path = path
        self.banned = unwritable_ids(self.model, self.tok)

    # ---- lm-eval plumbing ---------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        """Fingerprint for lm-eval's request cache."""
        return str(self.path)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's chat template (lm-eval's `--apply_chat_template`)."""
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor over ranks."""
        if self._world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's object on rank `dst` (None elsewhere)."""
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self._world_size > 1:
            torch.distributed.barrier()

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode_context(self, context: str) -> list[int]:
        """Context ids: a planning model's puzzle layout (puzzle + separator), else the text, with BOS in front
        when `add_bos_token` (Dream's default: off)."""
        if self.solver is not None:
            return self.solver.prompt_ids(context)
        ids = self.tok.encode(context)
        bos = self.model.config.bos_token_id
        if self.add_bos_token and bos is not None:
            ids = [bos] + ids
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids + EOS) for a likelihood request, as Dream's harness encodes it: trailing
        whitespace of the context moves to the continuation, the whole text is encoded once and split after the
        context's own tokens, and EOS is appended (the never-masked last position, so every continuation token is
        scored). A planning model's context is its prompt layout (puzzle + separator). An empty context gets BOS
        (else EOS), since position 0 is never scored."""
        eos = self.model.config.eos_token_id
        tail = [eos] if eos is not None else []
        if self.solver is not None:
            return self.solver.prompt_ids(context), self.tok.encode(continuation) + tail
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode_context(context)
        whole = self.encode_context(context + continuation)
        if not ctx:
            first = self.model.config.bos_token_id
            return [first if first is not None else eos], whole + tail
        return ctx, whole[len(ctx):] + tail

    # ---- request types ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(MC ELBO of the continuation in nats, greedy match) per (context, continuation) request."""
        if self.model.causal:
            raise DreamError("this is a causal (AR baseline) model: the MC ELBO needs a diffusion model; evaluate "
                             "it on generation tasks only")
        out = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise DreamError(f"the continuation {continuation!r} encodes to no tokens")
            ll = mc_elbo(self.model, ctx, cont, self.mc_num, self.mc_batch_size, self.sampling_eps, self.keep_last,
                         self.seed)
            greedy = greedy_match(self.model, ctx, cont, self.banned) if self.check_greedy else False
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Refused: perplexity tasks need a left-to-right factorisation, which a masked-diffusion model lacks."""
        raise DreamError("loglikelihood_rolling (perplexity tasks such as wikitext) is not supported by dreamlm: "
                         "a masked-diffusion model has no left-to-right factorisation; its MC ELBO is only a bound")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generated text per (context, gen_kwargs) request, cut at EOS and at the stop sequences."""
        items = [(r.args[0], dict(r.args[1] or {})) for r in requests]
        if self.solver is not None:
            solutions = self.solver.solve_batches([context for context, _ in items], batch=max(self.batch_size, 64))
            return [cut_at_stops(s.output, _until(kw)) for s, (_, kw) in zip(solutions, items)]
        planned = [self._plan(context, kwargs) for context, kwargs in items]
        # batch only canvases of one length: no padding, so a request's tokens never depend on its batch mates
        # (with left-padding the attention takes another kernel path whose last bits differ, and near-ties flip)
        by_length: dict[int, list[int]] = {}
        for i, (state, _) in enumerate(planned):
            by_length.setdefault(state.x.shape[1], []).append(i)
        for members in by_length.values():
            for start in range(0, len(members), self.batch_size):
                states = [planned[i][0] for i in members[start:start + self.batch_size]]
                while not all(s.done for s in states):
                    advance(self.model, [s for s in states if not s.done])
        out = []
        for (state, spans), (_, kwargs) in zip(planned, items):
            ids = state.output(False).squeeze(0).tolist()
            pieces = [cut_at_eos(ids[a:b], self.model.config.eos_token_id) for a, b in spans]
            text = "".join(self.tok.decode(p, skip_special_tokens=True) for p in pieces)
            out.append(cut_at_stops(text, _until(kwargs)))
        return out

    def _plan(self, context: str, kwargs: dict[str, Any]) -> tuple[Any, list[tuple[int, int]]]:
        """One request's DecodeState and the canvas spans whose text is the answer."""
        new_tokens = int(kwargs.get("max_gen_toks", self.max_new_tokens))
        sampler = dict(self.sampler)
        if "temperature" in kwargs:
            sampler["temperature"] = float(kwargs["temperature"])
        mask_id = self.model.config.mask_token_id
        constraints = Constraints(banned_token_ids=self.banned)
        if MASK_SPAN.search(context):  # an infill template: fill its spans in a canvas of its own length
            template = parse_template(self.tok, context, mask_id, self.model.config.bos_token_id)
            ids, spans, max_length, new_tokens = template.ids, template.spans, len(template.ids), None
            slots = sum(b - a for a, b in spans)
        else:
            ids, slots, max_length = self.encode_context(context), new_tokens, None
            spans = [(len(ids), len(ids) + new_tokens)]
        options = SamplerOptions(steps=self.steps or slots, **sampler)
        state = plan(self.model, torch.tensor([ids], dtype=torch.long), max_new_tokens=new_tokens,
                     max_length=max_length, options=options, constraints=constraints,
                     seed=request_seed(self.seed, ids))
        return state, spans


def _until(kwargs: dict[str, Any]) -> list[str]:
    until = kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _join_process_group() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, or joined from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()
