"""Process groups and FSDP2, kept apart from the model: the model code stays single-device.

Order of wrapping (as torchtitan documents it): activation checkpointing (a model flag), then `torch.compile` per
block, then `fully_shard` per block and at the root. Under torchrun on GPUs parameters are gathered in bf16 and
gradients reduced in fp32; on CPU (gloo) everything stays fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    """This process's place in the run."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0


def init_world(device: str) -> World:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(device if ":" in device else f"cuda:{local}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, dev)


def shard_model(model: nn.Module, world: World, compile_blocks: bool,
                param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Compile blocks (optional) and apply FSDP2 per block and at the root when distributed (computing in
    `param_dtype`, reducing gradients in fp32)."""
    layers = model.model.layers
    if compile_blocks:
        for block in layers:
            block.compile()
    if not world.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype != torch.float32 else MixedPrecisionPolicy()
    for block in layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum numbers over ranks (identity in one process)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, world: World,
               everywhere: bool = False) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on CPU: on rank 0, or on every rank with `everywhere`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                    world: World) -> None:
    """Load full state dicts (read on rank 0) into a possibly sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def barrier(world: World) -> None:
    """Wait for every rank."""
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    """Destroy the process group if this run made one."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
