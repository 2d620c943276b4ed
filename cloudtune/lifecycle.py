"""One run, end to end: plan -> ledger -> provision -> sync -> start -> stream logs -> pull -> teardown.

Each phase is a method of `Launch`; every status change goes through `Launch.transition`, which
writes the ledger. A machine's ledger row exists before the machine is asked for, and teardown
happens in `finally` whatever went wrong, so nothing cloudtune starts can be forgotten.
`teardown_one` is the only code that removes a machine: `run`, `pull` and `down` all use it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import manifest, receipt, report, units
from .backends import registry
from .backends.base import BUNDLE_FILE, Backend, Bundle, Quote, RunContext, build_bundle
from .backends.capabilities import DryRuns, KeepsCheckpoints, ListsMachines, check_machines
from .datasets import DatasetReport, inspect_dataset
from .errors import CloudtuneError, PullFailed, RunFailed, TeardownIncomplete
from .events import Events
from .ledger import FINAL_RUN_STATUSES, LEDGER_FILE, Ledger, LedgerError, machine_name
from .paths import home, runs_dir
from .recipe import Recipe
from .remote import checkpoints
from .remote.budget import budget_for
from .remote.checkpoints import RESUME_FROM_ENV
from .remote.launch import launch_env
from .remote.watchdog import process_alive
from .secrets import Redactor, collect, redact

LOG_TAIL_LINES = 25
CARRIED_CHECKPOINT = "checkpoint"  # in a run's work dir (kept from its machine) and in a resumed run's bundle
MIN_FREE_BYTES = 100 * 2**20  # logs, the ledger, receipts, a small adapter
BUNDLE_OVERHEAD_BYTES = 2**20  # the bundle beyond its dataset: recipe, scripts

BackendFor = Callable[[str], Backend]


@dataclass
class RunResult:
    run_id: str
    status: str
    receipt: dict[str, Any]
    already_pulled: bool = False  # `pull` of a run whose outputs had arrived: nothing was done


@dataclass
class Machine:
    """A machine as the ledger (or its backend's own list) knows it."""

    name: str
    run_id: str
    backend: str
    status: str
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict) -> Machine:
        return cls(name=row["name"], run_id=row["run_id"], backend=row["backend"], status=row["status"],
                   state=row["meta"])


@dataclass
class TeardownResult:
    machine: str
    run_id: str
    verified: bool
    problem: str | None = None  # what went wrong and what to do, when not verified


def outputs_base(recipe: Recipe) -> Path:
    """Where a recipe's runs put their outputs, each in a folder named by its run id."""
    base = Path(recipe.outputs.dir) if recipe.outputs.dir else Path("outputs") / recipe.run_name
    return base.expanduser().resolve()


def output_dir_for(recipe: Recipe, run_id: str) -> Path:
    return outputs_base(recipe) / run_id


def context_for(backend: Backend, machine: Machine, recipe: Recipe | None = None) -> RunContext:
    """Rebuild a run's context from its machine's ledger row (for `logs`, `pull`, `down`)."""
    try:
        state = backend.State.model_validate(machine.state)
    except ValidationError as exc:
        raise CloudtuneError(f"the ledger's record of {machine.name} does not fit the {backend.name} backend: "
                             f"{exc.errors()[0]['msg']}.",
                             "It was written by another cloudtune version; check the machine by hand.") from None
    return RunContext(run_id=machine.run_id, machine=machine.name, work_dir=runs_dir() / machine.run_id,
                      state=state, recipe=recipe)


# ----------------------------------------------------------------------------------------------
# before anything starts


def plan(recipe: Recipe, backend: Backend, events: Events, report: DatasetReport | None = None,
         continues: Continuation | None = None) -> tuple[Quote, DatasetReport]:
    """Read and count the data, then let the backend say where the run goes and what it costs."""
    check_machines(backend, recipe)
    with events.busy("reading the dataset and counting its tokens"):
        report = report or inspect_dataset(recipe)  # bad data fails here, before any machine is asked for
    if report.size_known:
        events.phase("data", f"{report.rows} rows, {report.tokens:,} tokens per epoch ({report.format})")
    else:
        events.phase("data", f"rows and tokens UNKNOWN ({report.format}): counted on the training machine")
        events.warn(report.size_note)
    with events.busy("pricing every offer for the whole run"):
        quote = backend.quote(recipe, report)
    if continues is not None:
        continues.check(quote.recipe)  # the recipe as it will train, fitted to the chosen offer
    events.phase("plan", quote.summary)
    for note in quote.notes:
        events.note(note)
    return quote, report


def preview(recipe: Recipe, backend: Backend, events: Events, continues: Continuation | None = None
            ) -> dict[str, Any]:
    """`run --dry-run`: the plan and what would be launched; nothing is rented."""
    if not isinstance(backend, DryRuns):
        raise CloudtuneError(f"--dry-run shows what a cloud run would rent; the {backend.name} backend rents "
                             "nothing.", "Leave out --backend (SkyPilot is the default) to see the plan and the task.")
    quote, _ = plan(recipe, backend, events, continues=continues)
    check_before_renting(quote.recipe)
    with events.busy(f"checking the task with {backend.name}'s own loader (importing it takes seconds)"):
        shown = backend.dry_run(quote)
    with tempfile.TemporaryDirectory(prefix="cloudtune-dry-run-") as scratch, \
            events.busy("building the bundle a run ships (recipe, data, the cloudtune wheel)"):
        # The same bundle a run makes before it rents anything (the wheel included), so a dry run fails
        # where the run would; nothing of it is kept.
        ctx = RunContext(run_id="dry-run", machine=machine_name("dry-run"), work_dir=Path(scratch),
                         state=backend.new_state(), recipe=quote.recipe)
        bundle = make_bundle(backend, ctx, continues)
        size = bundle.path.stat().st_size
    shown["bundle"] = {"bytes": size, "sha256": bundle.sha256, "files": bundle.files}
    shown["notes"] = [*shown.get("notes", []), f"the bundle it ships: {size / 1024:.0f} KiB, "
                      f"{', '.join(name.removeprefix('bundle/') for name in bundle.files)}"]
    return shown


def check_before_renting(recipe: Recipe) -> dict[str, str]:
    """What `run` checks before it asks for a machine, which `run --dry-run` checks too: the recipe's
    secrets are set and safe to redact, and there is room for the bundle and the outputs. The secrets' values."""
    values = collect(recipe.secrets)  # registers the values: `redact` hides them from here on
    check_free_space(recipe, outputs_base(recipe))
    return values


def make_bundle(backend: Backend, ctx: RunContext, continues: Continuation | None = None) -> Bundle:
    """The one archive a run ships: recipe, data, what the backend adds (the cloudtune wheel) and the
    checkpoint a continued run resumes from."""
    files = backend.bundle_files(ctx) | (continues.bundle_files() if continues else {})
    return build_bundle(ctx.recipe, ctx.work_dir / BUNDLE_FILE, files)


# ----------------------------------------------------------------------------------------------
# one run


def run(recipe: Recipe, backend: Backend, events: Events | None = None, *, ledger: Ledger | None = None,
        report: DatasetReport | None = None, continues: Continuation | None = None) -> RunResult:
    """Plan, then run on the backend end to end; raises RunFailed/PullFailed with what to do.
    `continues`: an earlier run's kept checkpoint to train on from (`run --resume`)."""
    events = events or backend.events
    quote, _ = plan(recipe, backend, events, report, continues)
    return Launch(quote, backend, events, ledger or Ledger(), continues).execute()


@dataclass(frozen=True)
class Continuation:
    """A stopped run's checkpoint, kept on this machine, that a new run carries and resumes from."""
    run_id: str
    checkpoint: Path
    recipe_path: str | None  # what the run trained, the default recipe of its continuation
    backend: str

    def check(self, recipe: Recipe) -> None:
        """Refused before anything is rented when the recipe no longer trains what the checkpoint was made by."""
        progress = self.checkpoint / "progress.json"
        try:
            made_by = json.loads(progress.read_text()).get("recipe")
        except (OSError, ValueError, AttributeError):
            raise CloudtuneError(f"run {self.run_id}: its checkpoint {self.checkpoint} is missing or damaged.",
                                 "Start the run anew without --resume.") from None
        if made_by != recipe.training_fingerprint():
            raise CloudtuneError(f"{recipe.source or 'the recipe'} no longer trains what run {self.run_id} trained: "
                                 "its model, method, lora, dataset or training settings changed since, so resuming "
                                 "would not continue that run.",
                                 "Resume with the recipe (and data) as they were, or start a new run without --resume.")

    def bundle_files(self) -> dict[str, Path]:
        return {f"{CARRIED_CHECKPOINT}/{self.checkpoint.name}/{path.relative_to(self.checkpoint)}": path
                for path in sorted(self.checkpoint.rglob("*")) if path.is_file()}


def continuation(run_ref: str, ledger: Ledger | None = None) -> Continuation:
    """The run `run --resume RUN` continues and the checkpoint it kept; refused when it kept none."""
    run_row = (ledger or Ledger()).get_run(run_ref)
    if not run_row["meta"].get("checkpoint"):
        raise CloudtuneError(f"run {run_row['id']} ({run_row['status']}) kept no checkpoint to resume from.",
                             "An interrupted run or one max_cost stopped keeps one; a failed run only when "
                             "training.checkpoint_steps saved one before it failed. Start it anew without --resume.")
    return Continuation(run_id=run_row["id"], checkpoint=Path(run_row["meta"]["checkpoint"]),
                        recipe_path=run_row["recipe_path"] or None, backend=run_row["backend"])


class Launch:
    """One run of one recipe on one backend, from its ledger row to its teardown."""

    def __init__(self, quote: Quote, backend: Backend, events: Events, ledger: Ledger,
                 continues: Continuation | None = None):
        self.recipe = quote.recipe
        self.continues = continues
        self.stopped_early = False  # the training ended before its last step: its checkpoint is kept
        self.price = quote.price
        self.backend = backend
        self.events = events
        self.ledger = ledger
        self.secrets = check_before_renting(self.recipe)
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.started = time.time()
        self.machine_status = "requested"

    def transition(self, status: str, **fields: Any) -> None:
        """The one place a run's status changes: the ledger gets it with the machine's state so far. The
        machine's state is written first, so whoever sees the new status (`logs`, `down`, a killed CLI's
        sweep) also sees what it needs to reach the job, e.g. SkyPilot's job id once "running"."""
        self.save_machine()
        self.ledger.update_run(self.run_id, status=status, **fields)

    def save_machine(self, status: str | None = None) -> None:
        self.machine_status = status or self.machine_status
        self.ledger.set_machine(self.ctx.machine, self.machine_status, **self.ctx.state.model_dump(mode="json"))

    def execute(self) -> RunResult:
        self.open()
        status, keep_machine = "failed", False
        try:
            # What can fail here fails before anything is rented.
            self.bundle = make_bundle(self.backend, self.ctx, self.continues)
            self.provision()
            self.sync()
            self.start()
            self.train()
            try:
                result = self.pull()
            except CloudtuneError as exc:
                keep_machine = True
                raise PullFailed(redact(f"run {self.run_id}: training finished but its outputs did not come "
                                        f"back: {exc.message}"), retry_pull_hint(self.run_id)) from exc
            status = "succeeded"
            return result
        except KeyboardInterrupt:
            status = "cancelled"
            self.events.warn(f"interrupted: stopping run {self.run_id}")
            self.stop_training()
            raise
        except StoppedByDown as exc:
            status = "cancelled"
            self.record(error=exc.message)
            raise
        except BaseException as exc:
            self.record(error=str(exc))
            raise
        finally:
            self.remove_secrets()
            self.close(status, keep_machine)

    # phases ----------------------------------------------------------------------------------------

    def open(self) -> None:
        """The run's ledger rows, before anything is asked of the backend."""
        recipe = self.recipe
        self.run_id = self.ledger.add_new_run(name=recipe.run_name, backend=self.backend.name,
                                              recipe_path=str(recipe.source or ""), recipe_hash=recipe.fingerprint(),
                                              **receipt.estimate_columns(self.price))
        self.output_dir = output_dir_for(recipe, self.run_id)
        self.ctx = RunContext(run_id=self.run_id, machine=machine_name(self.run_id),
                              work_dir=runs_dir() / self.run_id, state=self.backend.new_state(), recipe=recipe)
        self.ledger.update_run(self.run_id, output_dir=str(self.output_dir),
                               meta={"secret_names": list(recipe.secrets), "launcher": launcher_identity(),
                                     **({"continues": self.continues.run_id} if self.continues else {})})
        if self.continues:
            self.ledger.update_run(self.continues.run_id, meta={"continued_by": self.run_id})
        self.events.phase("run", f"{self.run_id} ({self.backend.name})")
        self.ledger.add_machine(self.ctx.machine, self.run_id, self.backend.name)

    def provision(self) -> None:
        self.transition("provisioning")
        self.events.phase("provision", self.ctx.machine)
        self.backend.provision(self.ctx)
        self.save_machine("up")

    def sync(self) -> None:
        self.transition("syncing")
        bundle = self.bundle
        self.events.phase("sync", f"bundle {bundle.path.stat().st_size / 1024:.0f} KiB, sha256 {bundle.sha256[:12]}")
        self.backend.sync(self.ctx, bundle, self.secrets)

    def start(self) -> None:
        price_per_hour = (self.price or {}).get("price_per_hour")
        budget = budget_for(self.recipe.compute.max_cost, price_per_hour, time.time() - self.started)
        self.ctx.train_env.update(launch_env(self.recipe.compute.gpu_count))
        if budget is not None:
            self.ctx.train_env.update(budget.env())
            self.events.note(f"max_cost {units.money(budget.max_cost)} at {units.per_hour(budget.price_per_hour)}: "
                             f"the training stops with its outputs so far after {units.duration(budget.train_seconds)}")
        if self.continues:
            self.ctx.train_env[RESUME_FROM_ENV] = f"bundle/{CARRIED_CHECKPOINT}/{self.continues.checkpoint.name}"
            self.events.note(f"continuing run {self.continues.run_id} from its checkpoint "
                             f"{self.continues.checkpoint.name}")
        self.backend.start(self.ctx, resume=self.continues is not None)
        self.transition("running")

    def train(self) -> None:
        self.events.phase("train", "streaming the training log")
        for line in self.backend.logs(self.ctx, follow=True):
            line = redact(line)
            self.tail.append(line)
            self.events.log(line)
        code = self.backend.exit_code(self.ctx)
        if code != 0 and self.torn_down_elsewhere():
            raise StoppedByDown(f"run {self.run_id}: stopped by `cloudtune down` (from another terminal) before "
                                "its training ended; nothing was pulled.",
                                f"Its log so far: `cloudtune logs {self.run_id}`; where `down` kept its checkpoint, "
                                f"`cloudtune run --resume {self.run_id}` trains on from it.")
        if code != 0:
            why = (f"exited with status {code}" if code is not None else
                   "ended without an exit status (killed, or its disk was too full to write one?)")
            raise RunFailed(f"run {self.run_id}: training {why}. Last lines of its log:\n" + "\n".join(self.tail),
                            f"Full log: cloudtune logs {self.run_id}")

    def torn_down_elsewhere(self) -> bool:
        """Whether another cloudtune process (`down`) has begun tearing this run's machine down."""
        try:
            row = self.ledger.machine_for_run(self.run_id)
        except LedgerError:
            return False
        return bool(row) and row["status"] in ("terminating", "terminated")

    def pull(self) -> RunResult:
        self.transition("pulling")
        self.events.phase("pull", str(self.output_dir))
        pulled = fetch_outputs(self.backend, self.ctx, self.output_dir)
        wall_seconds = round(time.time() - self.started, 1)
        made = receipt.build(pulled, run_id=self.run_id, backend=self.backend.name, machine=self.ctx.machine,
                             wall_seconds=wall_seconds, output_dir=self.output_dir, price=self.price)
        write_receipt_and_report(made, self.output_dir, self.events)
        self.ledger.update_run(self.run_id, **receipt.ledger_columns(made))
        self.stopped_early = bool(made.get("budget_stop"))
        return RunResult(run_id=self.run_id, status="succeeded", receipt=made)

    def stop_training(self) -> None:
        """On Ctrl-C: the backend's failure to stop (a machine still provisioning, an API server gone) is
        reported, never raised over the interrupt; teardown follows either way."""
        try:
            self.backend.stop(self.ctx)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raised, the run is still torn down
            self.events.warn(f"could not stop the training on {self.ctx.machine} ({type(exc).__name__}: "
                             f"{str(exc)[:300]}); tearing the machine down")

    def remove_secrets(self) -> None:
        """First thing once the training has ended, before anything that can fail (a full disk under the
        ledger, a failed pull that keeps the machine): the secrets were read at start and are not needed."""
        try:
            self.backend.remove_secrets(self.ctx)
        except Exception as exc:  # noqa: BLE001 - reported; the run's own ending must still be recorded
            self.events.warn(f"could not remove the secrets file from {self.ctx.machine} "
                             f"({type(exc).__name__}: {exc}); `cloudtune down {self.run_id}` removes the machine")
        (self.ctx.work_dir / BUNDLE_FILE).unlink(missing_ok=True)  # a copy of the dataset, on the machine now

    def record(self, **fields: Any) -> None:
        """A ledger write on the way out: if the ledger cannot take it (a full disk), the run's own error
        is still the one reported and the machine is still torn down."""
        try:
            self.ledger.update_run(self.run_id, **fields)
        except LedgerError as exc:
            self.events.warn(f"{exc.message} Run {self.run_id} may show a stale status there.")

    def close(self, status: str, keep_machine: bool) -> None:
        self.record(status=status, wall_seconds=round(time.time() - self.started, 1))
        if keep_machine:
            self.ctx.state.pull_failed = True
            self.save_machine("up")
            self.events.warn(f"{self.ctx.machine} is left up with the outputs on it. " + retry_pull_hint(self.run_id))
        else:
            if status != "succeeded" or self.stopped_early:
                keep_checkpoint(self.backend, self.ctx, self.ledger, self.events)
            teardown_one(self.backend, self.ctx, self.ledger, self.events)


def keep_checkpoint(backend: Backend, ctx: RunContext, ledger: Ledger, events: Events) -> Path | None:
    """A run that ended before its last step keeps its newest checkpoint here, off the machine that is
    about to go, so `run --resume` can train on from it anywhere. Never raises: teardown comes next."""
    if not isinstance(backend, KeepsCheckpoints):
        return None
    try:
        kept = backend.fetch_checkpoint(ctx, ctx.work_dir / CARRIED_CHECKPOINT)
        if kept is not None:
            ledger.update_run(ctx.run_id, meta={"checkpoint": str(kept)})
    except Exception as exc:  # noqa: BLE001 - reported; the teardown that follows must still run
        events.warn(f"could not keep the newest checkpoint of {ctx.machine} ({type(exc).__name__}: {exc}); "
                    "the run cannot be resumed")
        return None
    if kept is not None:
        events.note(f"checkpoint of step {checkpoints.step_of(kept)} kept in {kept}: "
                    f"`cloudtune run --resume {ctx.run_id}` trains on from it")
    return kept


class StoppedByDown(RunFailed):
    """The run's machine was torn down by `cloudtune down` from elsewhere while it trained."""


def launcher_identity() -> dict[str, Any]:
    """Which process is driving a run, so `status` can tell a run whose CLI died from one still watched."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def launcher_alive(run_row: dict) -> bool | None:
    """Whether the CLI that started a run still runs; None when that cannot be told from here."""
    launcher = run_row["meta"].get("launcher") or {}
    if launcher.get("host") != socket.gethostname() or not launcher.get("pid"):
        return None
    return process_alive(launcher["pid"])


def recent_runs(limit: int, ledger: Ledger | None = None) -> list[dict]:
    """`cloudtune status`: the newest runs, each unfinished one saying whether its CLI is still there."""
    runs = (ledger or Ledger()).runs(limit)
    for run_row in runs:
        if run_row["status"] not in FINAL_RUN_STATUSES:
            run_row["launcher_alive"] = launcher_alive(run_row)
    return runs


def check_free_space(recipe: Recipe, output_dir: Path) -> None:
    """Refuse to start when CLOUDTUNE_HOME (bundle, logs, the ledger, and the local backend's machine)
    or the outputs' disk is nearly full: found after training, it costs the run and leaves partial files."""
    dataset = recipe.dataset_file()
    bundle = (dataset.stat().st_size if dataset is not None and dataset.is_file() else 0) + BUNDLE_OVERHEAD_BYTES
    needs = [(home(), 2 * bundle + MIN_FREE_BYTES, "2× the bundle + 100 MB"),
             (output_dir, MIN_FREE_BYTES, "100 MB for the outputs")]
    for where, needed, rule in needs:
        existing = next(path for path in (where, *where.parents) if path.exists())
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise CloudtuneError(f"only {free / 2**20:.0f} MB free on the disk of {where}; a run needs "
                                 f"{needed / 2**20:.0f} MB there ({rule}). Nothing was started.",
                                 "Free some space there (or point CLOUDTUNE_HOME / outputs.dir elsewhere) and run "
                                 "again.")


def retry_pull_hint(run_id: str) -> str:
    return (f"Fetch them with `cloudtune pull {run_id}` (it tears the machine down afterwards), or give them up "
            f"with `cloudtune down {run_id}`. A cloud machine also tears itself down after compute.autostop_minutes "
            f"idle, outputs and all.")


def fetch_outputs(backend: Backend, ctx: RunContext, output_dir: Path) -> dict[str, Any]:
    """Pull beside output_dir, verify every checksum, then install all of it (or nothing) as output_dir."""
    manifest.install(lambda staging: backend.pull(ctx, staging), output_dir)
    return receipt.read_run_json(output_dir)


# ----------------------------------------------------------------------------------------------
# after a run: pull again, tear down


def write_receipt_and_report(made: dict[str, Any], output_dir: Path, events: Events) -> None:
    """The receipt, naming the report drawn from the outputs just installed."""
    try:
        made["report"] = str(report.write_report(output_dir, made).html)
    except Exception as exc:  # noqa: BLE001 - a picture must never cost the run its receipt
        events.warn(f"no report: {type(exc).__name__}: {exc}; `cloudtune report {made['run_id']}` tries again")
    receipt.write(made, output_dir)


def pull_again(run_ref: str, events: Events, *, ledger: Ledger | None = None,
               backend_for: BackendFor | None = None) -> RunResult:
    """`cloudtune pull RUN`: fetch the outputs of a run whose pull failed, then tear its machine down."""
    ledger = ledger or Ledger()
    run_row = ledger.get_run(run_ref)
    row = ledger.machine_for_run(run_row["id"])
    arrived = receipt.read_receipt(Path(run_row["output_dir"])) if run_row.get("output_dir") else None
    if run_row["status"] == "succeeded" and arrived is not None:
        return RunResult(run_id=run_row["id"], status="succeeded", receipt=arrived, already_pulled=True)
    if row is None or row["status"] == "terminated":
        raise CloudtuneError(f"run {run_row['id']}: its machine is gone, and its outputs with it.",
                             "`cloudtune status` shows the runs whose outputs arrived.")
    backend = (backend_for or _backend_for(events))(run_row["backend"])
    ctx = context_for(backend, Machine.from_row(row))
    output_dir = Path(run_row["output_dir"])
    events.phase("pull", str(output_dir))
    pulled = fetch_outputs(backend, ctx, output_dir)  # a failure leaves the machine as it is, for another try
    made = receipt.build(pulled, run_id=run_row["id"], backend=backend.name, machine=ctx.machine,
                         wall_seconds=run_row["wall_seconds"], output_dir=output_dir,
                         price=receipt.estimate_columns(run_row) or None)
    write_receipt_and_report(made, output_dir, events)
    ledger.update_run(run_row["id"], status="succeeded", error=None, **receipt.ledger_columns(made))
    ctx.state.pull_failed = False
    teardown_one(backend, ctx, ledger, events)
    return RunResult(run_id=run_row["id"], status="succeeded", receipt=made)


@dataclass
class TrainingLog:
    """`cloudtune logs`: the lines, and for a log that turns out empty, why it is."""

    run_id: str
    lines: Iterator[str]
    run_row: dict[str, Any]

    def why_empty(self) -> str:
        status, error = self.run_row["status"], (self.run_row.get("error") or "").strip()
        if status in FINAL_RUN_STATUSES:
            ended = f"run {self.run_id} {status} before its training wrote a line"
            return f"{ended}: {error.splitlines()[0]}" if error else f"{ended}."
        return (f"run {self.run_id} is {status}: its training has not written a line yet "
                f"(`cloudtune logs {self.run_id} -f` follows it).")


def training_log(run_ref: str, *, follow: bool = False, ledger: Ledger | None = None,
                 backend_for: BackendFor | None = None) -> TrainingLog:
    """`cloudtune logs RUN`: a run's log from wherever it is, redacted with the secrets this shell holds."""
    ledger = ledger or Ledger()
    run_row = ledger.get_run(run_ref)
    row = ledger.machine_for_run(run_row["id"])
    if row is None:
        raise CloudtuneError(f"run {run_row['id']} never got a machine, so it has no log.",
                             "`cloudtune status` shows why it ended.")
    backend = (backend_for or _backend_for(Events()))(run_row["backend"])
    hide = Redactor([os.environ[name] for name in run_row["meta"].get("secret_names", []) if os.environ.get(name)])
    lines = backend.logs(context_for(backend, Machine.from_row(row)), follow=follow)
    return TrainingLog(run_row["id"], (hide(line) for line in lines), run_row)


def sweep_dead_runs(ledger: Ledger | None = None) -> int:
    """At every CLI start: clean what runs whose CLI died (SIGKILL, a crash, a full disk) left behind
    (their secrets file first), where the backend can do that cheaply. One ledger query; how many were cleaned.

    Best effort: a ledger that cannot be read now is the next command's to report, not this sweep's.
    """
    if ledger is None and not (home() / LEDGER_FILE).exists():
        return 0  # nothing ever ran here; do not create a ledger for `--help` or `init`
    try:
        ledger = ledger or Ledger()
        machines = ledger.unfinished_machines()
    except (CloudtuneError, sqlite3.Error, OSError):
        return 0
    cleaned = 0
    for row in machines:
        try:
            sweep = registry.entry(row["backend"]).sweeper()
            cleaned += bool(sweep and sweep(row["meta"]))
        except (CloudtuneError, OSError):  # an unknown backend, a folder already gone: nothing to do here
            continue
    return cleaned


def _backend_for(events: Events) -> BackendFor:
    return lambda name: registry.create(name, events=events)


def teardown_one(backend: Backend, ctx: RunContext, ledger: Ledger, events: Events) -> TeardownResult:
    """Remove one machine and say whether that is verified. Never raises for the backend's failures:
    the caller goes on with the next machine, and the ledger says `unknown` with what to do."""
    try:
        ledger.set_machine(ctx.machine, "terminating", **ctx.state.model_dump(mode="json"))
    except LedgerError as exc:  # a ledger that cannot be written is no reason to leave a machine running
        events.warn(exc.message)
    events.phase("teardown", ctx.machine)
    for attempt in (1, 2):
        try:
            verified = backend.teardown(ctx)
            break
        except Exception as exc:  # noqa: BLE001 - whatever the backend raised, the other machines come first
            problem = (f"tearing down {ctx.machine} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                       f"run `cloudtune down {ctx.run_id}` to try again")
            return _left_unknown(ctx, ledger, events, problem)
        except KeyboardInterrupt:
            if attempt == 2:
                _left_unknown(ctx, ledger, events, f"teardown of {ctx.machine} interrupted; it may still be running. "
                                                   f"Run `cloudtune down {ctx.run_id}`.")
                raise
            events.warn(f"still tearing down {ctx.machine}; interrupt again to leave it "
                        f"(then `cloudtune down {ctx.run_id}` removes it)")
    if not verified:
        return _left_unknown(ctx, ledger, events, f"could not verify that {ctx.machine} is gone; "
                                                  f"run `cloudtune down {ctx.run_id}`")
    ledger.set_machine(ctx.machine, "terminated", **ctx.state.model_dump(mode="json"))
    return TeardownResult(machine=ctx.machine, run_id=ctx.run_id, verified=True)


def _left_unknown(ctx: RunContext, ledger: Ledger, events: Events, problem: str) -> TeardownResult:
    ledger.set_machine(ctx.machine, "unknown")
    events.warn(problem)
    return TeardownResult(machine=ctx.machine, run_id=ctx.run_id, verified=False, problem=problem)


def find_machines(run_ref: str | None, ledger: Ledger | None = None, *, backend_for: BackendFor | None = None,
                  problems: list[str] | None = None) -> list[Machine]:
    """Machines not yet verified gone: all of them (the ledger's and those backends list themselves),
    or the one of a run."""
    ledger = ledger or Ledger()
    if run_ref is not None:
        row = ledger.machine_for_run(ledger.get_run(run_ref)["id"])
        return [Machine.from_row(row)] if row and row["status"] != "terminated" else []
    machines = [Machine.from_row(row) for row in ledger.machines()]
    return machines + _listed_by_backends(ledger, machines, backend_for or _backend_for(Events()), problems)


def _listed_by_backends(ledger: Ledger, known: list[Machine], backend_for: BackendFor,
                        problems: list[str] | None) -> list[Machine]:
    """Machines a backend knows that the ledger does not list as live (its record lost or wrong).

    Only backends used here are asked: asking may be slow (SkyPilot starts its API server for it).
    """
    rows = {row["name"]: row for row in ledger.machines(include_terminated=True)}
    known_names = {machine.name for machine in known}
    found = []
    for name in sorted({row["backend"] for row in rows.values()}):
        backend = backend_for(name)
        if not isinstance(backend, ListsMachines):
            continue
        try:
            listed = backend.list_machines()
            shared = backend.shared_machines()
        except Exception as exc:  # noqa: BLE001 - one backend's trouble must not block tearing down the rest
            if problems is not None:
                problems.append(f"could not list the {name} backend's machines ({type(exc).__name__}: "
                                f"{str(exc)[:300]}); {backend.check_by_hand}")
            continue
        if problems is not None:
            problems += [f"{machine}: {what}" for machine, what in sorted(shared.items())]
        for machine, status in sorted(listed.items()):
            if machine in known_names:
                continue
            row = rows.get(machine)
            found.append(Machine(name=machine, run_id=row["run_id"] if row else machine.removeprefix("ct-"),
                                 backend=name, status=f"{status} in {name}", state=row["meta"] if row else {}))
    return found


def tear_down(machines: list[Machine], events: Events, ledger: Ledger | None = None, *,
              backend_for: BackendFor | None = None) -> list[TeardownResult]:
    """`cloudtune down`: every machine attempted, whatever happens to the others."""
    ledger = ledger or Ledger()
    backend_for = backend_for or _backend_for(events)
    return [_tear_down_machine(machine, ledger, events, backend_for) for machine in machines]


def check_all_gone(results: list[TeardownResult]) -> None:
    failed = [result for result in results if not result.verified]
    if failed:
        raise TeardownIncomplete(f"{len(failed)} of {len(results)} machine(s) not verified gone: "
                                 f"{', '.join(result.machine for result in failed)}.",
                                 "Each is marked `unknown` in the ledger; `cloudtune down RUN` tries again, and the "
                                 "warnings above say what went wrong.")


def _tear_down_machine(machine: Machine, ledger: Ledger, events: Events, backend_for: BackendFor) -> TeardownResult:
    try:
        backend = backend_for(machine.backend)
        if not ledger.machine_for_run(machine.run_id):  # a machine only its backend knew: give it a row
            _adopt(ledger, machine)
        ctx = context_for(backend, machine)
        if ledger.get_run(machine.run_id)["status"] != "succeeded":
            # said first, so that a CLI still watching this run reads why its training stopped
            ledger.set_machine(machine.name, "terminating")
            backend.stop(ctx)  # the training saves a checkpoint as it stops, which is then kept
            keep_checkpoint(backend, ctx, ledger, events)
    except Exception as exc:  # noqa: BLE001 - reported like a failed teardown, and the loop goes on
        problem = f"cannot tear down {machine.name}: {getattr(exc, 'message', exc)}"
        ledger.set_machine(machine.name, "unknown")
        events.warn(problem)
        return TeardownResult(machine=machine.name, run_id=machine.run_id, verified=False, problem=problem)
    result = teardown_one(backend, ctx, ledger, events)
    if result.verified:
        _mark_run_cancelled(ledger, machine.run_id)
    return result


def _adopt(ledger: Ledger, machine: Machine) -> None:
    try:
        ledger.get_run(machine.run_id)
    except CloudtuneError:
        ledger.add_run(machine.run_id, name=machine.name, backend=machine.backend)
        ledger.update_run(machine.run_id, status="cancelled", error="found by `cloudtune down`, not in the ledger")
    ledger.add_machine(machine.name, machine.run_id, machine.backend)


def _mark_run_cancelled(ledger: Ledger, run_id: str) -> None:
    run_row = ledger.get_run(run_id)
    if run_row["status"] not in FINAL_RUN_STATUSES:
        ledger.update_run(run_id, status="cancelled", error="torn down by `cloudtune down`")


# ----------------------------------------------------------------------------------------------
# clean: what finished runs leave under $CLOUDTUNE_HOME that nothing needs any more


@dataclass
class Freed:
    run_id: str
    path: str
    bytes: int
    what: str


# A finished run's scratch, by its path in the run's folder: never needed again once the run ended.
SCRATCH = {BUNDLE_FILE: "the bundle archive (recipe, a copy of the dataset)",
           "upload": "SkyPilot's upload folder (a copy of the bundle)",
           "machine/bundle": "the local machine's unpacked bundle"}
PULLED_COPY = ("machine/out", "the local machine's copy of outputs already pulled")


def clean(dry_run: bool = False, ledger: Ledger | None = None) -> list[Freed]:
    """`cloudtune clean`: free the copies finished runs left behind (their scratch, and a local machine's
    out/ once its outputs were pulled); what was (or, with dry_run, would be) freed.

    Never touched: a run still going (or whose CLI died: its outputs may still be pulled), out/ of a run
    whose outputs did not arrive, the checkpoint a stopped run kept for `run --resume`, your outputs."""
    if ledger is None and not (home() / LEDGER_FILE).exists():
        return []
    ledger = ledger or Ledger()
    freed: list[Freed] = []
    for folder in sorted(path for path in runs_dir().iterdir() if path.is_dir()):
        try:
            row = ledger.get_run(folder.name)
        except CloudtuneError:
            continue  # not a run this ledger knows: not ours to judge
        if row["id"] != folder.name or row["status"] not in FINAL_RUN_STATUSES:
            continue
        found = dict(SCRATCH)
        out_dir = Path(row["output_dir"]) if row["output_dir"] else None
        if row["status"] == "succeeded" and out_dir is not None and (out_dir / manifest.MANIFEST).is_file():
            found[PULLED_COPY[0]] = PULLED_COPY[1]
        for relative, what in found.items():
            path = folder / relative
            if not path.exists() and not path.is_symlink():
                continue
            freed.append(Freed(row["id"], str(path), _size(path), what))
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return freed


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())
