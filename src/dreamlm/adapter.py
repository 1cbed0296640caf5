"""LoRA adapters: train a small low-rank update of a base model and ship only that.

A LoRA layer adds (alpha / r) · B A x to a frozen linear layer W x, with A (r, in) and B (out, r); B starts at zero, so
an adapted model starts exactly as its base. Besides the low-rank pairs an adapter may train a few whole tensors
(the RMSNorm weights) and a few rows of the input embedding (tokens the base never saw, such as the mask token).

On disk an adapter is PEFT's layout, so `peft` can load it too: `adapter_config.json` (peft_type LORA, r, lora_alpha,
target_modules, base_model_name_or_path) and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight`
/ `.lora_B.weight`. The extras live in the same file under `dreamlm.` names (`dreamlm.full.<param>` for whole tensors,
`dreamlm.rows.<param>` + `dreamlm.row_ids.<param>` for embedding rows), which peft ignores. Every verb loads an
adapter directory as a normal model: the base is loaded and the update merged into its weights (no extra cost at
inference).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dreamlm.errors import DreamError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSpec:
    """What an adapter trains: rank, scale, target linear layers (by last name), norms, embedding rows."""

    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_norms: bool = True
    train_rows: list[int] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; `merged()` gives the plain layer back."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        a = torch.empty(rank, base.in_features)
        # PEFT's default init for A (Kaiming-uniform with a = sqrt(5)), B = 0: the adapted model starts as the base
        bound = 1 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(h, self.lora_A.to(h.dtype)), self.lora_B.to(h.dtype))
        return self.base(h) + update * self.scale

    def delta(self) -> torch.Tensor:
        """The update of the weight, (out, in), in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the update added to its weight."""
        with torch.no_grad():
            self.base.weight += self.delta().to(self.base.weight.dtype)
        self.base.weight.requires_grad_(True)
        return self.base


def _row_mask_hook(ids: list[int], rows: int) -> callable:
    keep = torch.zeros(rows, 1)
    keep[ids] = 1.0

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * keep.to(grad.device, grad.dtype)
    return hook


def add_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> list[str]:
    """Freeze `model` and wrap its target linear layers in LoraLinear (in place); returns the wrapped module names.
    Norm weights (spec.train_norms) and the embedding rows in spec.train_rows stay trainable; every other row of the
    embedding gets a zero gradient (so, with no weight decay on it, AdamW never moves it)."""
    if spec.rank < 1 or spec.alpha <= 0:
        raise DreamError("adapter.rank must be >= 1 and adapter.alpha > 0")
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in spec.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoraLinear(child, spec.rank, spec.alpha, gen))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise DreamError(f"adapter.targets {spec.targets} name no linear layer of this model")
    if spec.train_norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.requires_grad_(True)
    if spec.train_rows:
        embed = model.model.embed_tokens.weight
        if max(spec.train_rows) >= embed.shape[0] or min(spec.train_rows) < 0:
            raise DreamError(f"adapter.train_rows {spec.train_rows} lie outside the vocabulary ({embed.shape[0]})")
        embed.requires_grad_(True)
        embed.register_hook(_row_mask_hook(spec.train_rows, embed.shape[0]))
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoraLinear modules of a model by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoraLinear by its merged nn.Linear (in place) and return the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state(model: nn.Module, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file names (PEFT's for the LoRA pairs, `dreamlm.` for the extras)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().float().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().float().contiguous()
    if spec.train_norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                state[f"dreamlm.full.{name}"] = p.detach().float().contiguous()
    if spec.train_rows:
        ids = torch.tensor(sorted(set(spec.train_rows)))
        state["dreamlm.rows.model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach()[ids].float()
        state["dreamlm.row_ids.model.embed_tokens.weight"] = ids
    return state


def save_adapter(model: nn.Module, spec: LoraSpec, path: str | Path, base: str,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the adapter directory (config + weights; float tensors in `dtype`); `base` names the base model (a hub
    name such as 'smollm2-base' or a path)."""
    from dreamlm.checkpoint import atomic_write

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in adapter_state(model, spec).items()}
    config = {"peft_type": "LORA", "task_type": None, "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": sorted(spec.targets), "base_model_name_or_path": base,
              "dreamlm": {"train_norms": spec.train_norms, "train_rows": sorted(set(spec.train_rows))}}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write(path / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return path


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` holds an adapter (adapter_config.json) rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict:
    """The adapter_config.json of an adapter directory, checked."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DreamError(f"{file} is not a readable adapter config ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise DreamError(f"{file}: only LoRA adapters (peft_type LORA) are supported")
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("base_model_name_or_path", str)):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise DreamError(f"{file}: {key} is missing or of the wrong type")
    if config["r"] < 1 or config["lora_alpha"] <= 0:
        raise DreamError(f"{file}: r must be >= 1 and lora_alpha > 0")
    return config


def apply_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Merge the adapter at `path` into `model`'s weights (in place); DreamError when it does not fit the model."""
    path = Path(path)
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise DreamError(f"{path} has no {ADAPTER_WEIGHTS}")
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise DreamError(f"{file} is not a readable safetensors file ({type(exc).__name__})") from None
    scale = config["lora_alpha"] / config["r"]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith(".lora_A.weight") and key.startswith(PEFT_PREFIX):
                name = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
                b = state.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
                layer = modules.get(name)
                if b is None or not isinstance(layer, nn.Linear):
                    raise DreamError(f"{file}: {name} is not a linear layer of this model (or lacks lora_B)")
                delta = (b.float() @ tensor.float()) * scale
                if delta.shape != layer.weight.shape:
                    raise DreamError(f"{file}: {name} has shape {tuple(delta.shape)}, the model's is "
                                     f"{tuple(layer.weight.shape)}")
                layer.weight += delta.to(layer.weight.dtype)
            elif key.startswith("dreamlm.full."):
                target = params.get(key[len("dreamlm.full."):])
                if target is None or target.shape != tensor.shape:
                    raise DreamError(f"{file}: {key} does not fit this model")
                target.copy_(tensor.to(target.dtype))
            elif key.startswith("dreamlm.rows."):
                name = key[len("dreamlm.rows."):]
                ids = state.get(f"dreamlm.row_ids.{name}")
                target = params.get(name)
                if ids is None or target is None or tensor.shape != (len(ids), target.shape[1]) \
                        or int(ids.max()) >= target.shape[0]:
                    raise DreamError(f"{file}: {key} does not fit this model")
                target[ids.long()] = tensor.to(target.dtype)
            elif not (key.endswith(".lora_B.weight") or key.startswith("dreamlm.row_ids.")):
                raise DreamError(f"{file}: unknown tensor {key}")
    return model


@torch.no_grad()
def extract_adapter(base: nn.Module, tuned: nn.Module, spec: LoraSpec) -> nn.Module:
    """A low-rank delta of a fully fine-tuned model: `base` (modified in place and returned) gets LoraLinear layers
    whose pairs are the best rank-r approximation (truncated SVD) of tuned − base for each target layer, and the
    tuned norms and embedding rows of `spec`. Save it with save_adapter; other changes (e.g. the rest of the
    embedding) are dropped, so measure what the compression costs."""
    tuned_params = dict(tuned.named_parameters())
    add_lora(base, spec)
    for name, layer in lora_layers(base).items():
        delta = tuned_params[f"{name}.weight"].float() - layer.base.weight.float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:spec.rank].sqrt()
        layer.lora_B.copy_((u[:, :spec.rank] * root) / spec.scale ** 0.5)
        layer.lora_A.copy_((root[:, None] * vh[:spec.rank]) / spec.scale ** 0.5)
    for name, p in base.named_parameters():
        if spec.train_norms and name.endswith("norm.weight"):
            p.copy_(tuned_params[name])
    if spec.train_rows:
        ids = torch.tensor(spec.train_rows)
        base.model.embed_tokens.weight[ids] = tuned.model.embed_tokens.weight[ids].to(base.model.embed_tokens.weight.dtype)
    return base


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Set the LoraLinear pairs (and extras) of a model wrapped by add_lora from an adapter directory of the same
    rank and targets: to continue training a shipped adapter."""
    config = read_adapter_config(path)
    layers = lora_layers(model)
    if not layers:
        raise DreamError("load_adapter_weights needs a model wrapped by add_lora")
    rank = next(iter(layers.values())).lora_A.shape[0]
    if config["r"] != rank:
        raise DreamError(f"{path}: rank {config['r']} differs from this run's adapter.rank {rank}")
    state = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    for name, layer in layers.items():
        a, b = state.get(f"{PEFT_PREFIX}{name}.lora_A.weight"), state.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if a is None or b is None or a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
            raise DreamError(f"{path}: no matching lora_A/lora_B for {name}")
        # the file's scale may differ from this run's: keep the product B·A·scale the same
        layer.lora_A.copy_(a.float())
        layer.lora_B.copy_(b.float() * (config["lora_alpha"] / config["r"]) / layer.scale)
    for key, tensor in state.items():
        if key.startswith("dreamlm.full."):
            params[key[len("dreamlm.full."):]].copy_(tensor.float())
        elif key.startswith("dreamlm.rows."):
            name = key[len("dreamlm.rows."):]
            params[name][state[f"dreamlm.row_ids.{name}"].long()] = tensor.to(params[name].dtype)
