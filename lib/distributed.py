"""Data-parallel training with torch.distributed, launched by torchrun: process group, device, collectives.

torchrun (``python -m torch.distributed.run``) starts one process per device and gives each RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A process started without them (plain
``python train_img.py``) is a single-process run: no process group, and every helper here is the
identity, so the training code has one path for both.

Under torchrun each process drives cuda:LOCAL_RANK with NCCL, or the CPU with gloo.

The process group meets in torchrun's store under a prefix naming the attempt (TORCHELASTIC_RESTART_COUNT).
torchrun --max-restarts keeps one store across the restarts of a group, so without it a restarted rank
can read what a killed rank published in the previous attempt (its address) and fail to connect or hang
(measured with gloo: 7 of 7 restarts of a killed rank, none with the prefix).
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.config import ConfigError, resolve_device


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among world_size processes and the device it drives."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    local_rank: int = 0  # the rank among the processes of this machine

    @property
    def is_main(self):
        """The process that writes the run folder (logs, metrics, samples, checkpoints)."""
        return self.rank == 0

    @property
    def is_distributed(self):
        return self.world_size > 1


def init_distributed(device_name):
    """Read torchrun's environment, pick this process's device and join the process group.

    device_name: the --device flag (auto, cpu, cuda or cuda:N). Raises ConfigError (one line) for a
    device that cannot be honoured; without torchrun's variables, returns a single-process Distributed.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return Distributed(device=resolve_device(device_name))
    rank, local_rank = _env_int("RANK", None), _env_int("LOCAL_RANK", None)
    if device_name.startswith("cuda:"):
        raise ConfigError(f"--device={device_name}: under torchrun each process uses cuda:LOCAL_RANK; "
                          "pass --device=cuda (or auto, or cpu)")
    device = torch.device("cpu") if device_name == "cpu" else resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                              "visible; start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, store=_attempt_store(rank, world_size), rank=rank,
                                world_size=world_size)
    else:
        dist.init_process_group("gloo", store=_attempt_store(rank, world_size), rank=rank, world_size=world_size)
    return Distributed(rank=rank, world_size=world_size, device=device, local_rank=local_rank)


def _attempt_store(rank, world_size):
    """The store at MASTER_ADDR:MASTER_PORT, as init_process_group's env:// would open it, with its keys scoped to
    this attempt of the group (see the module's docstring)."""
    address = os.environ.get("MASTER_ADDR")
    if not address:
        raise ConfigError("MASTER_ADDR is not set: launch with torchrun, which sets it with MASTER_PORT")
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    store = dist.TCPStore(address, _env_int("MASTER_PORT", None), world_size,
                          is_master=rank == 0 and not agent_hosts_it,
                          timeout=datetime.timedelta(minutes=30))  # init_process_group's default timeout
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown(ctx):
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx):
    if ctx.is_distributed:
        dist.barrier()


def first_error(ctx, message):
    """Agree on failure: each rank passes its error message (or None); every rank gets the first one.

    A set-up step that fails on one rank only (a data folder missing on one node) must stop all of
    them, or the others would wait forever in their first collective.
    """
    if not ctx.is_distributed:
        return message
    messages = [None] * ctx.world_size
    dist.all_gather_object(messages, message)
    for rank, text in enumerate(messages):
        if text is not None:
            return text if rank == 0 else f"(rank {rank}) {text}"
    return None


def broadcast_from_main(ctx, obj):
    """Rank 0's `obj` on every rank (e.g. the checkpoint it read, so all ranks resume from one file)."""
    if not ctx.is_distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_rank_values(ctx, values):
    """values: (K,) this rank's numbers -> (world_size, K), row r holding rank r's values, on every rank."""
    if not ctx.is_distributed:
        return values[None]
    table = torch.zeros(ctx.world_size, *values.shape, dtype=values.dtype, device=values.device)
    table[ctx.rank] = values
    dist.all_reduce(table)  # every other row adds zeros, so a NaN stays in the row of the rank that had it
    return table


def gather_in_order(parts, world_size):
    """parts: [(key, tensor (n_i, ...)), ...] from each of world_size ranks -> all of them concatenated by key,
    on every rank (on the CPU).

    Keys must be distinct across ranks (e.g. global batch indices), so the result is the same
    whatever the number of ranks.
    """
    parts = [(key, t.detach().cpu()) for key, t in parts]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, parts)
        parts = [p for rank_parts in everyone for p in rank_parts]
    keys = [key for key, _ in parts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"gather_in_order needs distinct keys, got {sorted(keys)}")
    return torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"{name} is not set: launch with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
