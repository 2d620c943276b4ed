"""Which checkpoints a run holds, and carrying one to a new machine.

Stdlib only: the CLI (keeping the newest checkpoint of a stopped run, `run --resume`) and the trainer
(resuming) must read checkpoints by the same rule, and the CLI never imports torch.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"  # under the trainer's --out
STEP_PREFIX = "step-"
# Written last, into a checkpoint whose every other file is in place. The rename in
# cloudtune.train.checkpoint.save is atomic on a local disk but a copy-then-delete on a bucket mount
# (SkyPilot's MOUNT_CACHED), where a preempted machine can leave a step-N folder half copied: only a
# folder with this file counts. The SkyPilot run script (backends/scripts/skypilot_run.sh) tests for
# the same name.
COMPLETE = "COMPLETE"
# Where a checkpoint carried in the bundle lies, relative to the directory the trainer starts in.
RESUME_FROM_ENV = "CLOUDTUNE_RESUME_FROM"


def complete(out: Path) -> list[Path]:
    """Complete checkpoints under out/checkpoints (those with their marker), oldest first."""
    root = out / CHECKPOINTS
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(STEP_PREFIX):])


def seed_from_carried(out: Path) -> Path | None:
    """Put the checkpoint a resumed run carried in its bundle where `--resume` looks, unless out/ has
    one of its own already (a machine that restarted after the seed was made keeps its newer one)."""
    carried = os.environ.get(RESUME_FROM_ENV)
    if not carried or complete(out):
        return None
    source = Path(carried)
    if not source.is_dir():
        return None
    target = out / CHECKPOINTS / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".carried-{source.name}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    os.rename(partial, target)
    return target
