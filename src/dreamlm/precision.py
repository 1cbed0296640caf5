"""One precision policy for training and inference.

`auto` means bf16 where the hardware multiplies bf16 natively (a CUDA GPU that supports it; an x86 CPU with
AVX512-BF16 or AMX), float32 everywhere else. What always stays float32, whatever the choice: training keeps fp32
master weights and optimizer state (bf16 is an autocast, not a cast of the parameters), and the loss, CART weights,
log-softmax and metrics are computed in fp32; the sampler's confidence, entropy, Gumbel and top-p arithmetic runs on
fp32 logits (`sampling.generate` upcasts), so Dream's semantics hold in either precision.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamlm.errors import DreamError

PRECISIONS = ("auto", "fp32", "bf16")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def cpu_bf16_features() -> list[str]:
    """The native bf16 instruction sets of this CPU (e.g. ['avx512_bf16', 'amx_bf16']); [] when it has none."""
    found = []
    probes = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"))
    for flag, probe in probes:
        check = getattr(torch.cpu, probe, None)  # private probes: fall back to /proc/cpuinfo where they are missing
        if check is not None:
            try:
                if check():
                    found.append(flag)
                continue
            except RuntimeError:
                pass
        if flag in _cpuinfo_flags():
            found.append(flag)
    return found


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 natively, and why (a few words for the user)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "this GPU supports bf16" if ok else "this GPU has no native bf16"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, f"this CPU multiplies bf16 natively ({', '.join(features)})"
        return False, "this CPU has no native bf16 (no AVX512-BF16 or AMX)"
    return False, f"bf16 is not chosen automatically on {device.type}"


@dataclass(frozen=True)
class Precision:
    """A resolved choice: the compute dtype and a sentence saying why it was chosen."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp16" if self.dtype == torch.float16 else "fp32"

    def describe(self) -> str:
        """One line for the user, e.g. 'precision: bf16 (auto: this CPU multiplies bf16 natively (avx512_bf16))'."""
        return f"precision: {self.name} ({self.reason})"

    def autocast(self, device: torch.device | str) -> AbstractContextManager:
        """The training autocast for this precision (a no-op context for fp32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)


def training_precision(name: str, device: torch.device | str) -> Precision:
    """Training precision: 'auto' | 'fp32' | 'bf16' → Precision for `device`."""
    if name not in PRECISIONS:
        raise DreamError(f"unknown precision {name!r}; choose {', '.join(PRECISIONS)}")
    if name == "fp32":
        return Precision(torch.float32, "asked for")
    if name == "bf16":
        return Precision(torch.bfloat16, "asked for")
    ok, why = native_bf16(device)
    return Precision(torch.bfloat16 if ok else torch.float32, f"auto: {why}")


def inference_precision(name: str | None, device: torch.device | str) -> Precision:
    """Inference weights: 'auto' (or None) | 'float32' | 'bfloat16' | 'float16' → Precision for `device`."""
    name = name or "auto"
    if name not in DTYPE_CHOICES:
        raise DreamError(f"unknown dtype {name!r}; choose {', '.join(DTYPE_CHOICES)}")
    if name != "auto":
        return Precision(getattr(torch, name), "asked for")
    ok, why = native_bf16(device)
    return Precision(torch.bfloat16 if ok else torch.float32, f"auto: {why}")
