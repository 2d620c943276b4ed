"""Several processes, one training: torchrun's environment, the process group, and what the ranks agree on.

A plain `python -m cloudtune.train` is world size 1 and never touches torch.distributed. Under torchrun
(cloudtune/remote/launch.py starts it) every rank loads the model, takes a disjoint share of each
optimizer step's micro-batches, and the ranks agree once per step on the loss and on whether to stop.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import CloudtuneError

# Bound every collective: a rank that died or hangs ends the run with an error instead of a hang. The
# longest wait is the other ranks waiting for rank 0 to write a checkpoint.
COLLECTIVE_TIMEOUT_ENV = "CLOUDTUNE_COLLECTIVE_TIMEOUT_S"
COLLECTIVE_TIMEOUT_S = 900
# Joining the group and the first all-reduce: every rank starts at once under torchrun, so a rank
# missing after this long will not come.
PREFLIGHT_TIMEOUT_ENV = "CLOUDTUNE_PREFLIGHT_TIMEOUT_S"
PREFLIGHT_TIMEOUT_S = 180


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the outputs and prints the step lines."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    size = int(environ.get("WORLD_SIZE", "1"))
    return World(rank=int(environ.get("RANK", "0")), size=size, local_rank=int(environ.get("LOCAL_RANK", "0")),
                 local_size=int(environ.get("LOCAL_WORLD_SIZE", str(size))))


def _seconds(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    value = environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def pick_device(world: World = World()) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise CloudtuneError(f"{world.local_size} training processes on this machine, but it shows {count} GPU(s).",
                             "Set compute.gpu_count to at most the machine's GPUs, or leave it unset to use them all.")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def join(world: World, device: torch.device) -> None:
    """Join the process group and all-reduce once, each within the preflight timeout: a rank that cannot
    reach the others fails here with the likely cause, not hours later or never."""
    if not world.distributed:
        return
    import torch.distributed as dist

    preflight = _seconds(PREFLIGHT_TIMEOUT_ENV, PREFLIGHT_TIMEOUT_S)
    cuda = device.type == "cuda"
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=preflight),
                                device_id=device if cuda else None)
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
        if cuda:
            torch.cuda.synchronize(device)
        if int(probe.item()) != world.size:
            raise RuntimeError(f"the all-reduce summed to {probe.item()}, not {world.size}")
    except (RuntimeError, dist.DistError) as exc:  # the c10d errors: store timeouts, NCCL and gloo failures
        raise preflight_error(world, device, preflight, exc) from None
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=_seconds(COLLECTIVE_TIMEOUT_ENV, COLLECTIVE_TIMEOUT_S)))


def preflight_error(world: World, device: torch.device, seconds: int, exc: BaseException) -> CloudtuneError:
    what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
    if device.type == "cuda":
        return CloudtuneError(
            f"rank {world.rank} of {world.size}: the GPUs could not exchange data within {seconds}s ({what}). "
            "Rented multi-GPU machines most often fail here because their GPUs cannot reach each other directly "
            "(no peer-to-peer: consumer cards such as RTX 4090 pairs, some virtualised hosts).",
            "Train with NCCL_P2P_DISABLE=1 in the training machine's environment (the image's ENV, or the "
            "machine's own), and NCCL_IB_DISABLE=1 where there is no InfiniBand; NCCL_DEBUG=INFO shows where it "
            "stops. Or train on one GPU: compute.gpu_count: 1.")
    return CloudtuneError(
        f"rank {world.rank} of {world.size}: the training processes could not all meet within {seconds}s ({what}). "
        "Another rank failed to start, or the nodes cannot reach each other on the rendezvous port.",
        "Look above for another rank's error; between machines, open the master port (29500) on node 0.")


# What gloo's and NCCL's errors say when a peer is gone (gloo raises a plain RuntimeError).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL", "ProcessGroupGloo", "gloo",
             "Timed out", "timed out")


def lost_contact(exc: BaseException) -> CloudtuneError | None:
    """A collective that failed mid-training, as the error to show (a peer died or stopped answering);
    None for any other error, and in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(exc).strip()
    if not isinstance(exc, dist.DistError) and not any(needle in text for needle in PEER_GONE):
        return None
    world = world_from_env()
    what = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
    return CloudtuneError(f"rank {world.rank} of {world.size} lost contact with the other ranks ({what}).",
                          "Another rank died (its error, or that it was killed, is above: often out of memory); "
                          "--resume continues from the last checkpoint.")


def summed(world: World, value: float) -> float:
    """`value` summed over the ranks (each rank's part of the step's loss)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item())


def any_of(world: World, *flags: bool) -> list[bool]:
    """Each flag, raised if it is raised on any rank."""
    if not world.distributed:
        return list(flags)
    import torch.distributed as dist

    raised = torch.tensor([float(flag) for flag in flags], device=_collective_device())
    dist.all_reduce(raised, op=dist.ReduceOp.MAX)
    return [value > 0 for value in raised.tolist()]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def from_main(world: World, value):
    """Rank 0's value on every rank (a picklable object: a decision, a checkpoint's state)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gathered(world: World, value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def leave() -> None:
    """Leave the process group after a training that ended normally (after a failure the process just exits:
    tearing a broken group down can hang)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def stopping(world: World) -> None:
    """After the checkpoint of a stop: the first rank to exit 143 makes torchrun SIGTERM the others; they
    are done and exit 143 by themselves, so that signal must not kill one of them first."""
    if world.distributed:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_ranks(world: World, seed: int) -> None:
    """Every rank starts from the same seed so that they build the same weights; from the first step on each
    rank draws its own dropout masks (rank 0 the ones a single process would)."""
    if world.rank:
        torch.manual_seed(seed + world.rank)


def gradient_sync(model, last: bool):
    """Exchange gradients only after a rank's last micro-batch of the step: once per step, not per micro-batch."""
    from contextlib import nullcontext

    if not last and hasattr(model, "no_sync"):  # DistributedDataParallel
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return nullcontext()


def as_float(norm) -> float:
    """A grad norm as a number; under FSDP it is a DTensor over the shards."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def parallelism_for(recipe, world: World, config, device: torch.device) -> str:
    """ddp or fsdp for this run (none in a single process), by the planner's own rule
    (planning.memory.choose_parallelism) on the GPU this rank has."""
    if not world.distributed:
        return "none"
    from ..planning.memory import GIB, ModelShape, TrainSetup, choose_parallelism

    chosen = recipe.training.parallelism
    if chosen == "auto" and device.type != "cuda":
        chosen = "ddp"  # the CPU (tests, gloo): no GPU memory to measure against
    elif chosen == "auto":
        usable = torch.cuda.get_device_properties(device).total_memory
        if recipe.training.memory_limit_gib:
            usable = min(usable, recipe.training.memory_limit_gib * GIB)
        chosen = choose_parallelism("auto", ModelShape.from_config(config), TrainSetup.from_recipe(recipe),
                                    world.size, usable, recipe.training.max_seq_len,
                                    recipe.training.gradient_checkpointing, shardable=not recipe.fsdp_refusal)
    return chosen  # an explicit fsdp that cannot shard this fine-tune was refused with the recipe


def wrap(model, world: World, device: torch.device, parallelism: str):
    """The module the training steps run: DistributedDataParallel, or the model sharded in place by FSDP2
    (each decoder layer, then the root); the model itself when there is one process."""
    if not world.distributed:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from .model import decoder_layers

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
