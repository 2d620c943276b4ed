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


@dataclass
class State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save(out: Path, model, optimizer, scheduler, state: State) -> Path:
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{state.step:08d}"
    partial = root / f".partial-{state.step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    torch.save({"weights": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               partial / "state.pt")
    (partial / "progress.json").write_text(json.dumps(asdict(state)))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(partial, final)  # only complete checkpoints carry the step-N name
    return final


def latest(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def restore_latest(out: Path, model, optimizer, scheduler) -> State | None:
    path = latest(out)
    if path is None:
        return None
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved["weights"].items():
            params[name].copy_(tensor.to(params[name].device))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return State(**json.loads((path / "progress.json").read_text()))
