"""The Backend protocol and the bundle every backend ships.

A backend knows how to get a machine, put one archive on it, start one script, read its log, fetch
its outputs and make the machine go away. It knows nothing of recipes beyond the bundle.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..recipe import Recipe

# Runs the training from inside the unpacked bundle's parent directory, whatever the machine.
# Secrets come from a 0600 file (never the command line, which `ps` shows to everyone), and the
# exit status goes to a file so a client that lost its connection can still learn how it ended.
RUN_SCRIPT = """#!/bin/sh
cd "$(dirname "$0")/.."
if [ -f secrets.env ]; then set -a; . ./secrets.env; set +a; fi
PYTHON="${CLOUDTUNE_PYTHON:-python3}"
"$PYTHON" -u -m cloudtune.train bundle/recipe.yaml --out out "$@" >> train.log 2>&1
echo $? > exit_code
"""

LOG_FILE = "train.log"
EXIT_FILE = "exit_code"


@dataclass
class Bundle:
    path: Path
    sha256: str
    files: list[str]


@dataclass
class RunContext:
    """What a backend needs to act on one run; rebuilt from the ledger to reattach later."""

    run_id: str
    machine: str
    work_dir: Path  # local scratch for this run: bundle, pull staging, a copy of the log
    recipe: Recipe | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # backend specifics, persisted in the ledger


class Backend(ABC):
    name: str
    # The runner's Events while it drives a run (progress, warnings); None when `logs`/`down` rebuild
    # a backend from the ledger. A rebuilt backend must work from ctx.meta alone.
    events: Any = None

    def bundle_files(self, ctx: RunContext) -> dict[str, Path]:
        """Extra files this backend ships inside the bundle (e.g. the cloudtune wheel); none by default."""
        return {}

    @abstractmethod
    def provision(self, ctx: RunContext) -> None:
        """Get the machine; store whatever reattaching needs in ctx.meta."""

    @abstractmethod
    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        """Put the bundle (and the secrets, privately) on the machine."""

    @abstractmethod
    def start(self, ctx: RunContext, resume: bool = False) -> None:
        """Start the training detached from this process."""

    @abstractmethod
    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        """Yield the training log's lines from the start; with follow, until the training ends."""

    @abstractmethod
    def exit_code(self, ctx: RunContext) -> int | None:
        """The training's exit status, or None while it runs (or if it died without one)."""

    @abstractmethod
    def pull(self, ctx: RunContext, staging: Path) -> None:
        """Copy the training's `out/` directory into staging (verification is the runner's)."""

    @abstractmethod
    def stop(self, ctx: RunContext) -> None:
        """Stop the training process (Ctrl-C, `down`); the machine itself stays until teardown."""

    @abstractmethod
    def teardown(self, ctx: RunContext) -> bool:
        """Make the machine go away; return True only once that is verified."""


def bundle_recipe(recipe: Recipe) -> tuple[dict, Path | None]:
    """The recipe as the training machine sees it: only what the user set, dataset path inside the bundle."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    data["name"] = recipe.run_name
    dataset_file = recipe.dataset_file()
    if dataset_file is not None:
        data["dataset"]["path"] = f"data/{dataset_file.name}"
    return data, dataset_file


def build_bundle(recipe: Recipe, dest: Path, extra_files: dict[str, Path] | None = None) -> Bundle:
    """One reproducible archive (same inputs, same bytes, same sha256), so re-uploads can be skipped."""
    data, dataset_file = bundle_recipe(recipe)
    members: dict[str, bytes | Path] = {
        "bundle/recipe.yaml": yaml.safe_dump(data, sort_keys=False).encode(),
        "bundle/run.sh": RUN_SCRIPT.encode(),
    }
    if dataset_file is not None:
        members[f"bundle/data/{dataset_file.name}"] = dataset_file
    for name, path in (extra_files or {}).items():
        members[f"bundle/{name}"] = path
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            content = members[name]
            payload = content if isinstance(content, bytes) else content.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buffer.getvalue())
    return Bundle(path=dest, sha256=hashlib.sha256(buffer.getvalue()).hexdigest(), files=sorted(members))


def secrets_env(secrets: dict[str, str]) -> str:
    """A shell file of `export NAME='value'` lines, quoted so no value can break out."""
    lines = []
    for name, value in sorted(secrets.items()):
        lines.append(f"{name}='" + value.replace("'", "'\\''") + "'")
    return "\n".join(lines) + "\n"

