"""Throughput at named model shapes, for `dreamlm bench speed`: training tokens/s in fp32 against bf16 autocast,
the loss curves of both precisions on the same seed and data, and decoding tokens/s of the diffusion fast path
against transformers' autoregressive `generate` at one dtype.

Weights are random (speed does not depend on them); each comparison runs side by side in one process, its
measurements interleaved, so that the ratios survive a noisy shared machine better than the absolute numbers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.precision import Precision, training_precision


@dataclass(frozen=True)
class Shape:
    """A model shape by its HF config numbers (the vocabulary's last ids become mask / pad / EOS)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    rope_theta: float = 10000.0

    def config(self, context: int) -> DreamConfig:
        """A DreamConfig of this shape with a context of `context` tokens."""
        fields = {k: v for k, v in asdict(self).items() if k != "name"}
        v = self.vocab_size
        return DreamConfig(**fields, max_position_embeddings=context, max_window_layers=self.num_hidden_layers,
                           mask_token_id=v - 1, pad_token_id=v - 2, bos_token_id=v - 2, eos_token_id=v - 2)


def small_shape(hidden: int = 256, layers: int = 4, vocab: int = 4096) -> Shape:
    """The small random model every speed bench has used: heads of 64, a quarter as many KV heads, SwiGLU 8/3."""
    heads = max(1, hidden // 64)
    return Shape(f"small ({hidden} x {layers})", vocab, hidden, int(hidden * 8 / 3) // 64 * 64, layers, heads,
                 max(1, heads // 4))


# SmolLM2-135M's published shape (a Llama: no q/k/v bias, tied embeddings)
SMOLLM2_135M = Shape("SmolLM2-135M", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, attention_bias=False,
                     rope_theta=100000.0)


def random_model(shape: Shape, context: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 seed: int = 0) -> DreamModel:
    """A randomly initialised DreamModel of `shape` (HF's init), in `dtype` on `device`."""
    return DreamModel(shape.config(context)).init_weights(seed).to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _train_step(model: DreamModel, optimizer: torch.optim.Optimizer, precision: Precision, x: torch.Tensor,
                generator: torch.Generator) -> float:
    """One diffusion training step (Dream's 1/t loss; bf16 as an autocast over fp32 weights); returns the loss."""
    from dreamlm.training.objective import DiffusionObjective, diffusion_loss, mask_tokens, sample_times

    objective = DiffusionObjective()
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, 0] = False
    t = sample_times(x.shape[0], objective.eps, generator)
    _, masked = mask_tokens(x, maskable, t, model.config.mask_token_id, generator)
    with precision.autocast(x.device):
        out = diffusion_loss(model, x, maskable, objective, t, masked)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _optimizer(model: DreamModel, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def train_throughput(shape: Shape, batch: int = 8, seq: int = 256, steps: int = 3, warmup: int = 1,
                     device: str = "cpu", advance: Callable[..., None] | None = None) -> dict[str, Any]:
    """Training tokens/s of the same model in fp32 and in bf16 autocast (fp32 master weights and AdamW state):
    two copies, their steps interleaved; the median of `steps` timed steps after `warmup` untimed ones."""
    precisions = [training_precision(name, device) for name in ("fp32", "bf16")]
    models = [random_model(shape, seq, device=device).train() for _ in precisions]
    optimizers = [_optimizer(m) for m in models]
    data = torch.Generator().manual_seed(0)
    seconds: list[list[float]] = [[] for _ in precisions]
    for step in range(warmup + steps):
        x = torch.randint(0, shape.vocab_size - 2, (batch, seq), generator=data).to(device)
        for k, (model, optimizer, precision) in enumerate(zip(models, optimizers, precisions)):
            _sync(device)
            start = time.perf_counter()
            _train_step(model, optimizer, precision, x, torch.Generator().manual_seed(step))
            _sync(device)
            if step >= warmup:
                seconds[k].append(time.perf_counter() - start)
        if advance is not None:
            advance(label=f"training {shape.name}")
    rows = [{"precision": p.name, "seconds_per_step": statistics.median(s),
             "tokens_per_second": batch * seq / statistics.median(s)} for p, s in zip(precisions, seconds)]
    return {"shape": shape.name, "parameters": models[0].num_parameters(), "batch": batch, "seq": seq,
            "steps": steps, "rows": rows, "bf16_vs_fp32": rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]}


def loss_curves(steps: int = 100, batch: int = 8, seq: int = 128, seed: int = 0, device: str = "cpu",
                advance: Callable[..., None] | None = None) -> dict[str, Any]:
    """The training loss of a tiny model on the standard library's code (the bundled stdlib-code tokenizer), step
    by step in fp32 and in bf16 autocast: the same initial weights, batches and masking draws."""
    from dreamlm.tokenizer import DreamTokenizer
    from dreamlm.training.data import PackedBlocks, resolve_files

    tok = DreamTokenizer.from_pretrained(Path(str(resources.files("dreamlm") / "assets" / "stdlib-code")))
    if tok.mask_token_id is None:
        raise DreamError("the bundled tokenizer has no mask token")
    vocab = max(tok.vocab_size, tok.mask_token_id + 1)
    config = DreamConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                         max_window_layers=2, rope_theta=10000.0, mask_token_id=tok.mask_token_id,
                         pad_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    blocks = PackedBlocks(resolve_files(["stdlib:train"]), tok, seq, seed=seed)
    batches = [blocks.next_batch(batch).x for _ in range(steps)]
    curves: dict[str, list[float]] = {}
    for name in ("fp32", "bf16"):
        precision = training_precision(name, device)
        model = DreamModel(config).init_weights(seed).to(device).train()
        optimizer = _optimizer(model, lr=2e-3)
        masks = torch.Generator().manual_seed(seed)
        curves[name] = [_train_step(model, optimizer, precision, x.to(device), masks) for x in batches]
        if advance is not None:
            advance(label=f"loss curve {name}")
    return {"model": f"hidden 128 x 2 layers, vocab {vocab}", "parameters": DreamModel(config).num_parameters(),
            "batch": batch, "seq": seq, "steps": steps, "data": "stdlib:train", **curves}


def _transformers_model(model: DreamModel) -> Any:
    """The same weights in transformers' Qwen2ForCausalLM (q/k/v bias) or LlamaForCausalLM (none, as SmolLM2)."""
    import transformers

    c = model.config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                  rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings)
    if c.attention_bias:
        kind, hf_config = "Qwen2ForCausalLM", transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(hf_config)
    else:
        kind, hf_config = "LlamaForCausalLM", transformers.LlamaConfig(**common, attention_bias=False)
        hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict(), strict=False)
    return kind, hf.to(device=model.device, dtype=model.dtype).eval()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def decode_throughput(shape: Shape, batch: int = 4, prompt: int = 64, new_tokens: int = 448, per_forward: int = 4,
                      block_length: int = 32, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      vanilla: bool = False, compile: bool = False,  # noqa: A002
                      advance: Callable[..., None] | None = None) -> dict[str, Any]:
    """Tokens/s of decoding `new_tokens` after a `prompt` for `batch` rows, all at `dtype`: the diffusion fast path
    (`per_forward` tokens per pass, blocks of `block_length`, dual cache), optionally vanilla diffusion (one token
    per pass over the whole canvas) and the compiled no-cache path, our AR decoding with a KV cache, and
    transformers' greedy `generate` over the same weights. Each is warmed up on a short run, then timed once."""
    from dreamlm.sampling import diffusion_generate
    from dreamlm.sampling.autoregressive import ar_generate

    if new_tokens % block_length or (new_tokens // per_forward) % (new_tokens // block_length):
        raise DreamError(f"new_tokens ({new_tokens}) must be a multiple of block_length ({block_length}), with "
                         f"whole passes per block at {per_forward} tokens per pass")
    context = prompt + new_tokens
    model = random_model(shape, context, dtype=dtype, device=device).eval()
    x = torch.randint(0, shape.vocab_size - 2, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    tokens = batch * new_tokens
    runs: dict[str, dict[str, Any]] = {}
    fast = dict(steps=new_tokens // per_forward, block_length=block_length, cache="dual")
    runs[f"diffusion fast path ({per_forward}/pass, blocks {block_length}, dual cache)"] = fast
    if compile:
        runs[f"diffusion {per_forward}/pass, blocks {block_length}, no cache, compiled"] = dict(
            steps=new_tokens // per_forward, block_length=block_length, compile=True)
    if vanilla:
        runs["diffusion vanilla (1/pass)"] = dict(steps=new_tokens)
    rows = []
    with torch.no_grad():
        for label, kw in runs.items():
            if kw.get("compile"):  # compiled graphs are per shape: warm up (compile) on the timed shape itself
                warm, warm_tokens = kw, new_tokens
            else:  # one block's worth
                warm = dict(kw, steps=block_length // per_forward if "block_length" in kw else block_length)
                warm_tokens = block_length
            diffusion_generate(model, x, max_new_tokens=warm_tokens, alg="maskgit_plus", **warm)
            seconds = _timed(lambda: diffusion_generate(model, x, max_new_tokens=new_tokens, alg="maskgit_plus",
                                                        **kw), device)
            rows.append({"mode": label, "forward_passes": kw["steps"], "tokens_per_second": tokens / seconds})
            if advance is not None:
                advance(label=f"decode {shape.name}: {label}")
        model.causal = True
        ar_generate(model, x, 8, stop_at_eos=False)
        seconds = _timed(lambda: ar_generate(model, x, new_tokens, stop_at_eos=False), device)
        rows.append({"mode": "AR, KV cache (dreamlm)", "forward_passes": new_tokens, "tokens_per_second": tokens / seconds})
        model.causal = False
        kind, hf = _transformers_model(model)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        hf.generate(x, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
        seconds = _timed(lambda: hf.generate(x, **kwargs), device)
        rows.append({"mode": f"transformers {kind} generate (AR, KV cache)", "forward_passes": new_tokens,
                     "tokens_per_second": tokens / seconds})
        if advance is not None:
            advance(label=f"decode {shape.name}: AR")
    hf_rate = rows[-1]["tokens_per_second"]
    return {"shape": shape.name, "parameters": model.num_parameters(), "batch": batch, "prompt": prompt,
            "new_tokens": new_tokens, "canvas": context, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "rows": rows, "fast_vs_transformers": rows[0]["tokens_per_second"] / hf_rate}
