"""Training checkpoints: written into a temporary directory, renamed into place, then `latest` is switched
atomically — a crash at any moment leaves the previous checkpoint whole and `latest` pointing at it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dreamlm.checkpoint import atomic_write
from dreamlm.errors import DreamError

LATEST = "latest"


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(out_dir) / "checkpoints"


def save_training_checkpoint(out_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                             trainer_state: dict[str, Any], extra_json: dict[str, Any], keep: int) -> Path:
    """Write step-NNNNNNN/{model.safetensors, trainer_state.pt, run.json}; then point `latest` at it."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp, final = root / f".tmp-{name}", root / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # tied or shared tensors cannot be stored twice in safetensors; keep one copy of each storage
    seen: dict[int, str] = {}
    tensors, aliases = {}, {}
    for key, value in model_state.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else id(value)
        if ptr in seen and value.numel():
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        tensors[key] = value.detach().contiguous().cpu()
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save({**trainer_state, "aliases": aliases}, tmp / "trainer_state.pt")
    (tmp / "run.json").write_text(json.dumps(extra_json, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write(root / LATEST, lambda path: path.write_text(name + "\n"))
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale)
    return final


def load_training_checkpoint(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint `latest` names, or None if the run has none; never unpickles arbitrary objects."""
    root = checkpoint_root(out_dir)
    if not (root / LATEST).is_file():
        return None
    path = root / (root / LATEST).read_text().strip()
    if not (path / "model.safetensors").is_file() or not (path / "trainer_state.pt").is_file():
        raise DreamError(f"{root / LATEST} names {path.name}, which is incomplete; remove it to start over")
    model_state = load_file(str(path / "model.safetensors"))
    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    for key, source in trainer_state.pop("aliases", {}).items():
        model_state[key] = model_state[source]
    return model_state, trainer_state
