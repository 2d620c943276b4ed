"""Resumable checkpoints: trainable weights, optimizer, scheduler, data position and RNG state.

Spot machines die mid-run; `--resume` continues from the newest complete checkpoint, with the same
data order, so a recovered run trains what an uninterrupted one would have.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import CloudtuneError
from ..recipe import Recipe
from ..remote import checkpoints
from . import distributed
from .distributed import World

KEEP = 2  # the newest is enough to resume; one more in case the disk filled while writing it
BEST = "best.pt"  # the trainable weights at the lowest eval loss so far (outputs.keep: best)
COMPLETE = checkpoints.COMPLETE


@dataclass
class State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0
    # the eval loss so far (train/evaluation.py): what early stopping and outputs.keep best go on from
    evaluations: int = 0
    eval_seconds: float = 0.0
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: int = 0
    evals_since_best: int = 0


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _sharded(model) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # an FSDP2 module: each rank holds a slice


def full_weights(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on the host of rank 0 (empty on the others under FSDP)."""
    if not _sharded(model):
        return _trainable_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    _load_trainable(model, tensors)


def _full_state(model, optimizer) -> tuple[dict, dict]:
    """The trainable weights and the optimizer state, whole, on rank 0 (empty elsewhere under FSDP).

    FSDP's shards are gathered into one unsharded checkpoint, rather than written per rank with
    torch.distributed.checkpoint: a checkpoint then looks the same whatever the world size, so the CLI
    carries and resumes it as it always has, and a run may resume on a different number of GPUs. Only
    the trainable part is gathered, which for LoRA is small; for a full fine-tune rank 0 needs host
    memory for the whole model and its optimizer state.
    """
    if not _sharded(model):
        return _trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return full_weights(model), get_optimizer_state_dict(model, optimizer, options=options)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save(out: Path, recipe: Recipe, model, optimizer, scheduler, state: State, scaler=None,
         world: World = World()) -> Path:
    """Every rank calls it (FSDP gathers, each rank's RNG is kept); rank 0 writes; all return once it is written."""
    # with DDP rank 0's copy is everyone's; FSDP gathers the shards from every rank
    weights, optimizer_state = _full_state(model, optimizer) if world.main or _sharded(model) else ({}, {})
    rngs = distributed.gathered(world, _rng_state())
    final = out / "checkpoints" / f"step-{state.step:08d}"
    if world.main:
        _write(out, recipe, state, {"weights": weights, "optimizer": optimizer_state,
                                    "scheduler": scheduler.state_dict(),
                                    "scaler": scaler.state_dict() if scaler else None,
                                    "rng": rngs[0], "rng_ranks": rngs})
    distributed.barrier(world)  # no rank goes on (or exits) before the checkpoint is complete
    return final


def _write(out: Path, recipe: Recipe, state: State, content: dict) -> Path:
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{state.step:08d}"
    partial = root / f".partial-{state.step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    best = out / "checkpoints" / BEST
    # a resumed run must end with the best weights of the steps before it too
    content["best"] = torch.load(best, map_location="cpu") if best.exists() else None
    torch.save(content, partial / "state.pt")
    (partial / "progress.json").write_text(json.dumps({**asdict(state), "recipe": recipe.training_fingerprint()}))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(partial, final)
    _write_marker(final)
    kept = complete(out)[-KEEP:]
    for old in sorted(root.glob("step-*")):  # older complete ones, and any half-copied folder before the newest
        if old not in kept and (not kept or old < kept[-1]):
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(out: Path, model) -> None:
    """Keep the trainable weights as they are now, as the best so far (rank 0: its weights are everyone's)."""
    weights = full_weights(model)  # under FSDP every rank takes part
    if not distributed.world_from_env().main:
        return
    (out / "checkpoints").mkdir(exist_ok=True)
    _write_atomically(weights, out / "checkpoints" / BEST)


def restore_best(out: Path, model) -> None:
    """Put the best weights kept by save_best back into the model, and drop the file: it was a means."""
    path = out / "checkpoints" / BEST
    _load_trainable(model, torch.load(path, map_location="cpu"))
    path.unlink()
    if not any(path.parent.iterdir()):  # a run without checkpoint_steps leaves no empty folder behind
        path.parent.rmdir()


def _load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))


def _write_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    torch.save(tensors, partial)
    os.replace(partial, path)


def _write_marker(folder: Path) -> None:
    marker = folder / COMPLETE
    with marker.open("w") as handle:
        handle.write("complete\n")
        handle.flush()
        os.fsync(handle.fileno())


def complete(out: Path) -> list[Path]:
    """Complete checkpoints (those with their marker), oldest first."""
    return checkpoints.complete(out)


def _read_latest(out: Path, recipe: Recipe) -> tuple[dict, dict] | None:
    found = complete(out)
    if not found:
        return None
    path = found[-1]
    progress = json.loads((path / "progress.json").read_text())
    made_by = progress.pop("recipe", None)
    if made_by != recipe.training_fingerprint():
        raise CloudtuneError(f"{path} was made with different model/method/lora/dataset/training settings, "
                             "so resuming from it would not continue that run.",
                             "Resume with the recipe the run started with, or train into a new --out directory.")
    return progress, torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def restore_latest(out: Path, recipe: Recipe, model, optimizer, scheduler, scaler=None,
                   world: World = World()) -> State | None:
    """Rank 0 reads the newest checkpoint (on several machines only node 0 has it) and hands it to every rank."""
    read = _read_latest(out, recipe) if world.main else None
    sharded = _sharded(model)
    big = ("weights", "optimizer") if sharded else ()  # FSDP hands these out shard by shard below
    shared = distributed.from_main(world, None if read is None else
                                   (read[0], {k: v for k, v in read[1].items() if k not in big}))
    if shared is None:
        return None
    progress, saved = shared
    if sharded:
        _load_sharded(model, optimizer, read[1] if read else {})
    else:
        _load_trainable(model, saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
    if world.main and saved.get("best") is not None:  # the best file may be from steps after this checkpoint
        _write_atomically(saved["best"], out / "checkpoints" / BEST)
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):  # fp16's loss scale, so resuming does not re-learn it
        scaler.load_state_dict(saved["scaler"])
    ranks = saved.get("rng_ranks") or []
    rng = ranks[world.rank] if len(ranks) == world.size else saved["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return State(**progress)


def _load_sharded(model, optimizer, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, saved.get("weights", {}), options=options)
    set_optimizer_state_dict(model, optimizer, saved.get("optimizer", {}), options=options)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric rows past `step`: a resumed run redoes those steps and writes them again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # half a line from a process killed while writing it
        if row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    path.write_text("".join(kept))
