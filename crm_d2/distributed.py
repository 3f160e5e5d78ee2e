"""Many processes (torchrun): this process's rank and device, its share of a job list, and the few collectives the
commands and the trainer need, in one place.

`torchrun --nproc_per_node N -m crm_d2.cli COMMAND ...` sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. A
process group (nccl on CUDA, gloo on the CPU) is set up only when WORLD_SIZE > 1, so a plain run has none and every
collective here is a no-op in it.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "TIMEOUT", "world_from_env", "init_from_env", "session"]

# How long a collective waits for the slowest rank. The trainer's rank 0 validates while the others wait, and a
# command's ranks may finish far apart (unequal images), so torch's default (10 min for nccl) is too short.
TIMEOUT = timedelta(hours=2)

# Errors that travel from rank 0 to the others as they are (the CLI prints these as one-line errors).
_PORTABLE = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, RuntimeError)


def _collective(fn, *args, **kwargs):
    """A collective; when a peer has gone (it stopped on its own error, which it printed), say so in one line
    instead of the backend's connection error."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = ("another process of this run stopped (see its own error)" if "closed by peer" in said
               else f"waiting for the other processes failed ({said[:200]})")
        raise RuntimeError(f"{why}; rerun to resume") from exc


def world_from_env():
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) in a plain run."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


class DistEnv:
    """One process of a run: rank, world size, device, and collectives that do nothing in a single process."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None, owns_group=False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # a torch.device from init_from_env; in a plain `session` what the caller passed
        self.owns_group = owns_group  # this object set the process group up, so close() tears it down

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def shard(self, items):
        """This rank's share of a job list, items[rank::world_size]. Every rank must pass the same list in the
        same order (decide it on rank 0 with `decide` when it depends on the file system)."""
        return list(items)[self.rank::self.world_size]

    def barrier(self):
        if self.distributed:
            nccl = dist.get_backend() == "nccl" and isinstance(self.device, torch.device)
            _collective(dist.barrier, device_ids=[self.device.index] if nccl else None)

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on every rank (also a barrier)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        _collective(dist.all_gather_object, out, obj)
        return out

    def decide(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on rank 0 alone (a check that writes, or reads files the others are about to write);
        its result on every rank. An error of fn is raised on every rank, so that one refusal stops them all with
        the same message instead of leaving them waiting for rank 0."""
        if not self.distributed:
            return fn(*args, **kwargs)
        box, failure = [None], None
        if self.main:
            try:
                box[0] = (True, fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                failure = exc
                portable = exc if type(exc) in _PORTABLE else RuntimeError(f"{type(exc).__name__}: {exc}")
                box[0] = (False, portable)
        _collective(dist.broadcast_object_list, box, src=0)
        ok, value = box[0]
        if failure is not None:
            raise failure
        if not ok:
            value.said_by_rank0 = True  # the CLI prints it once, on rank 0
            raise value
        return value

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def with_index(device):
    """`device` with an explicit CUDA index: plain "cuda" means the current CUDA device. torch.cuda.set_device
    and set_per_process_memory_fraction refuse a CUDA device without an index (torch 2.11)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _local_device(device, world_size, local_rank):
    """None: CUDA when available, else the CPU. Under torchrun each process takes its own GPU, cuda:LOCAL_RANK,
    whatever index was asked for (one --device for all ranks cannot name N GPUs)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        device = torch.device("cuda", local_rank) if world_size > 1 else with_index(device)
        torch.cuda.set_device(device)
    return device


def init_from_env(device=None, timeout=TIMEOUT):
    """This process's DistEnv: its device (see `_local_device`) and, when WORLD_SIZE > 1, the process group
    (nccl on CUDA, gloo on the CPU; set up once)."""
    rank, world_size, local_rank = world_from_env()
    device = _local_device(device, world_size, local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        owns = True
    return DistEnv(rank, world_size, local_rank, device, owns_group=owns)


@contextmanager
def session(device=None):
    """A command's DistEnv. Under torchrun: the process group and this rank's device, torn down at the end (also
    after an error). In a plain run: a DistEnv that sets nothing up and keeps `device` as given (None: the
    Refiner's own choice), so that one process runs exactly as it always did."""
    rank, world_size, local_rank = world_from_env()
    env = init_from_env(device) if world_size > 1 else DistEnv(device=device)
    try:
        yield env
    finally:
        env.close()
