"""Process groups and parallel wrappers, kept apart from the model code (the torchtitan way).

A plain process: nothing is wrapped. Under `torchrun`: DDP (gloo on CPU, NCCL on GPU), or FSDP2 with
`fully_shard` on every transformer block and then on the root, chosen by `train.parallel`. That holds for
one process too, so `torchrun --nproc_per_node 1 ... train.parallel=fsdp` runs the FSDP code on one device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from kosmo.hardware import pick_device


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Env:
    dev = pick_device(device)
    if "RANK" not in os.environ:  # not started by torchrun
        return Env(device=dev)
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(rank=dist.get_rank(), world=world, device=dev)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, parallel: str, env: Env) -> torch.nn.Module:
    if not dist.is_initialized():
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in blocks_of(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of any kosmo model: every `blocks` ModuleList in it."""
    return [b for name, m in model.named_modules() if name.split(".")[-1] == "blocks" for b in m]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Unsharded weights under their plain names, gathered on every rank (all ranks must call)."""
    return get_model_state_dict(unwrap(model) if not _is_fsdp(model) else model, options=_FULL)


def load_model_state(model, state: dict[str, torch.Tensor]):
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model, optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model, optimizer, state: dict):
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _is_fsdp(model) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 outside a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()
