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


def save(out: Path, recipe: Recipe, model, optimizer, scheduler, state: State, scaler=None) -> Path:
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{state.step:08d}"
    partial = root / f".partial-{state.step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    best = out / "checkpoints" / BEST
    torch.save({"weights": _trainable_state(model), "optimizer": optimizer.state_dict(),
                # a resumed run must end with the best weights of the steps before it too
                "best": torch.load(best, map_location="cpu") if best.exists() else None,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               partial / "state.pt")
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
    """Keep the trainable weights as they are now, as the best so far."""
    (out / "checkpoints").mkdir(exist_ok=True)
    _write_atomically(_trainable_state(model), out / "checkpoints" / BEST)


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


def restore_latest(out: Path, recipe: Recipe, model, optimizer, scheduler, scaler=None) -> State | None:
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
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    _load_trainable(model, saved["weights"])
    if saved.get("best") is not None:  # the best file may be from steps after this checkpoint
        _write_atomically(saved["best"], out / "checkpoints" / BEST)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):  # fp16's loss scale, so resuming does not re-learn it
        scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return State(**progress)


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
