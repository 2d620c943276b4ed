"""The Backend lifecycle base, its typed options and machine state, and the bundle every backend ships.

A backend knows how to get a machine, put one archive on it, start one script, read its log, fetch
its outputs and make the machine go away. Of the recipe it reads only what choosing and starting a
machine needs (its compute section, the names of its secrets); abilities only some backends have
(pricing, dry runs, listing their machines) are opt-in, in capabilities.py.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..events import Events
from ..recipe import Recipe
from ..units import per_hour

if TYPE_CHECKING:
    from ..datasets import DatasetReport

LOG_FILE = "train.log"
EXIT_FILE = "exit_code"
SECRETS_FILE = "secrets.env"  # beside bundle/ on the machine, 0600; run.sh reads it once at start
BUNDLE_FILE = "bundle.tar.gz"  # in the run's local work_dir, only until it is on the machine


@dataclass
class Bundle:
    path: Path
    sha256: str
    files: list[str]


class MachineState(BaseModel):
    """What a backend records about one machine, kept in the ledger so a later command can reattach.

    Each backend extends it with its own typed fields; nothing else is stored for a machine.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    pull_failed: bool = Field(False, description="Training finished but its outputs did not arrive; the machine "
                                                 "is kept for `cloudtune pull`.")


class BackendOptions(BaseModel):
    """A backend's own settings from the command line; each field becomes a `run` flag (see registry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_for_launch(self) -> None:
        """Refuse options that cannot start a run (a backend rebuilt from the ledger needs fewer)."""


@dataclass
class RunContext:
    """What a backend needs to act on one run; rebuilt from the ledger to reattach later.

    `recipe` is there while a run is launched (backends read its `compute` section and secrets'
    names); it is None when `logs`, `pull` or `down` rebuild the context, so nothing after launch
    may need it.
    """

    run_id: str
    machine: str
    work_dir: Path  # local scratch for this run: bundle, pull staging, a copy of the log
    state: MachineState
    recipe: Recipe | None = None
    # Set by the lifecycle for the training's environment (the budget's deadline); never secrets,
    # which travel only in the private secrets file.
    train_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Quote:
    """What a backend says about a run before anything starts: where it goes and what it will cost."""

    summary: str  # one line: the machine and its price
    recipe: Recipe  # the recipe as it will run (a planner may fit its batch to the chosen GPU)
    price: dict[str, Any] | None = None  # the ledger's estimate columns; None when there is no price
    notes: list[str] = field(default_factory=list)  # what the user should know about this plan


class Backend(ABC):
    """The lifecycle every place-to-train implements; lifecycle.py drives it phase by phase.

    Contract: every method may be called on a backend rebuilt from the ledger (a new process, no
    memory of the run beyond `ctx.state`). `stop` and `teardown` must not raise when the machine
    or the training is already gone.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    State: ClassVar[type[MachineState]] = MachineState

    def __init__(self, options: BackendOptions | None = None, events: Events | None = None):
        self.options = options if options is not None else self.Options()
        self.events = events or Events()

    def new_state(self) -> MachineState:
        return self.State()

    def quote(self, recipe: Recipe, report: DatasetReport) -> Quote:
        """Where the run goes and its price, checked before anything is asked for. A machine the user
        provides costs what compute.price_per_hour says, if anything."""
        price = recipe.compute.price_per_hour
        if price is None:
            return Quote(summary=f"a machine you provide ({self.name} backend): cloudtune rents nothing, so it "
                                 "has no price (set compute.price_per_hour to count it)", recipe=recipe)
        return Quote(summary=f"a machine you provide ({self.name} backend) at {per_hour(price)} "
                             "(compute.price_per_hour)", recipe=recipe,
                     price={"gpu": self.name, "price_per_hour": price})

    def bundle_files(self, ctx: RunContext) -> dict[str, Path]:
        """Extra files this backend ships inside the bundle (e.g. the cloudtune wheel); none by default."""
        return {}

    @abstractmethod
    def provision(self, ctx: RunContext) -> None:
        """Get the machine; record whatever reattaching needs in ctx.state."""

    @abstractmethod
    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        """Put the bundle (and the secrets, privately) on the machine."""

    @abstractmethod
    def start(self, ctx: RunContext, resume: bool = False) -> None:
        """Start the training detached from this process; with resume, from the newest checkpoint."""

    @abstractmethod
    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        """Yield the training log's lines from the start; with follow, until the training ends."""

    @abstractmethod
    def exit_code(self, ctx: RunContext) -> int | None:
        """The training's exit status, or None while it runs (or if it died without one)."""

    @abstractmethod
    def pull(self, ctx: RunContext, staging: Path) -> None:
        """Copy the training's `out/` directory into staging (verification is the lifecycle's)."""

    @abstractmethod
    def stop(self, ctx: RunContext) -> None:
        """Stop the training process (Ctrl-C, `down`); the machine itself stays until teardown."""

    @abstractmethod
    def teardown(self, ctx: RunContext) -> bool:
        """Make the machine go away; return True only once that is verified."""

    def remove_secrets(self, ctx: RunContext) -> None:  # noqa: B027 - only backends that write a file need it
        """Delete the secrets from the machine's disk: the lifecycle calls it when the training has ended,
        however it ended (a machine kept for `cloudtune pull` must not keep them). A backend that writes
        a secrets file overrides it; it must not raise when the file or the machine is already gone."""


def bundle_recipe(recipe: Recipe) -> tuple[dict, dict[str, Path]]:
    """The recipe as the training machine sees it: only what the user set, data paths inside the bundle;
    and the data files by their place in the bundle."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    data["name"] = recipe.run_name
    files: dict[str, Path] = {}
    dataset_file = recipe.dataset_file()
    if dataset_file is not None:
        data["dataset"]["path"] = f"data/{dataset_file.name}"
        files[data["dataset"]["path"]] = dataset_file
    eval_file = recipe.eval_file()
    if eval_file is not None:  # a folder of its own: it may have the training file's name
        data["dataset"]["eval"] = {"path": f"data/eval/{eval_file.name}"}
        files[data["dataset"]["eval"]["path"]] = eval_file
    return data, files


def build_bundle(recipe: Recipe, dest: Path, extra_files: dict[str, Path] | None = None) -> Bundle:
    """One reproducible archive (same inputs, same bytes, same sha256), so re-uploads can be skipped."""
    data, data_files = bundle_recipe(recipe)
    members: dict[str, bytes | Path] = {
        "bundle/recipe.yaml": yaml.safe_dump(data, sort_keys=False).encode(),
        "bundle/run.sh": resources.files("cloudtune.backends").joinpath("scripts", "run.sh").read_bytes(),
    }
    for name, path in data_files.items():
        members[f"bundle/{name}"] = path
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


def write_secrets_file(path: Path, secrets: dict[str, str]) -> None:
    """The secrets as SECRETS_FILE on this machine's disk, readable by its owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets_env(secrets))


def secrets_env(secrets: dict[str, str]) -> str:
    """A shell file of `export NAME='value'` lines, quoted so no value can break out."""
    lines = []
    for name, value in sorted(secrets.items()):
        lines.append(f"{name}='" + value.replace("'", "'\\''") + "'")
    return "\n".join(lines) + "\n"

