"""One run, end to end: ledger -> provision -> sync -> start -> stream logs -> pull -> teardown.

Reads top to bottom. Teardown happens in `finally` whatever went wrong, and a machine's ledger row
exists before the machine is asked for, so nothing cloudtune starts can be forgotten.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import manifest
from .backends.base import Backend, RunContext, build_bundle
from .datasets import DatasetReport, inspect_dataset
from .errors import CloudtuneError
from .ledger import Ledger, machine_name, new_run_id
from .paths import runs_dir
from .recipe import Recipe
from .secrets import Redactor, collect

LOG_TAIL_LINES = 25


class RunFailed(CloudtuneError):
    """The training itself failed; the message carries the log tail."""


class PullFailed(RunFailed):
    """Training finished but its outputs did not arrive intact; the machine is left up so they are not lost."""


class Events:
    """What the runner reports while it works; the CLI renders these, tests record them."""

    def phase(self, name: str, detail: str = "") -> None:  # noqa: B027 - optional hook
        pass

    def log(self, line: str) -> None:  # noqa: B027
        pass

    def warn(self, message: str) -> None:  # noqa: B027
        pass

    def progress(self, label: str, done: int, total: int) -> None:  # noqa: B027
        """A transfer's progress in bytes (uploads, downloads); done == total when it completes."""


@dataclass
class RunResult:
    run_id: str
    status: str
    receipt: dict[str, Any]


def default_output_dir(recipe: Recipe, run_id: str) -> Path:
    base = Path(recipe.outputs.dir) if recipe.outputs.dir else Path("outputs") / recipe.run_name
    return (base.expanduser() / run_id).resolve()


def context_for(run: dict, recipe: Recipe | None = None) -> RunContext:
    """Rebuild a run's context from its ledger row (for `logs`, `down`, reattaching)."""
    return RunContext(run_id=run["id"], machine=machine_name(run["id"]), work_dir=runs_dir() / run["id"],
                      recipe=recipe, meta=dict(run["meta"]))


def execute(recipe: Recipe, backend: Backend, events: Events | None = None, *, ledger: Ledger | None = None,
            estimate: dict[str, Any] | None = None, report: DatasetReport | None = None) -> RunResult:
    events = events or Events()
    backend.events = events
    ledger = ledger or Ledger()
    report = report or inspect_dataset(recipe)  # bad data fails here, before any machine is asked for
    events.phase("data", f"{report.rows} rows, {report.tokens:,} tokens ({report.format})")
    secrets = collect(recipe.secrets)
    redact = Redactor(secrets)
    run_id = new_run_id()
    output_dir = default_output_dir(recipe, run_id)
    ctx = RunContext(run_id=run_id, machine=machine_name(run_id), work_dir=runs_dir() / run_id, recipe=recipe)
    ledger.add_run(run_id, name=recipe.run_name, backend=backend.name, recipe_path=str(recipe.source or ""),
                   recipe_hash=recipe.fingerprint(), output_dir=str(output_dir), **_estimate_columns(estimate))
    ledger.update_run(run_id, meta={"secret_names": list(recipe.secrets)})
    events.phase("run", f"{run_id} ({backend.name})")
    started = time.time()
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    status = "failed"
    keep_machine = False
    try:
        ledger.add_machine(ctx.machine, run_id, backend.name)
        ledger.update_run(run_id, status="provisioning")
        events.phase("provision", ctx.machine)
        backend.provision(ctx)
        ledger.set_machine(ctx.machine, "up", **ctx.meta)

        ledger.update_run(run_id, status="syncing")
        bundle = build_bundle(recipe, ctx.work_dir / "bundle.tar.gz", backend.bundle_files(ctx))
        events.phase("sync", f"bundle {bundle.path.stat().st_size / 1024:.0f} KiB, sha256 {bundle.sha256[:12]}")
        backend.sync(ctx, bundle, secrets)

        backend.start(ctx)
        ledger.update_run(run_id, status="running", meta=ctx.meta)
        events.phase("train", "streaming the training log")
        for line in backend.logs(ctx, follow=True):
            line = redact(line)
            tail.append(line)
            events.log(line)
        code = backend.exit_code(ctx)
        if code != 0:
            why = "ended without an exit status (killed?)" if code is None else f"exited with status {code}"
            raise RunFailed(f"run {run_id}: training {why}. Last lines of its log:\n" + "\n".join(tail),
                            f"Full log: cloudtune logs {run_id}")

        ledger.update_run(run_id, status="pulling")
        events.phase("pull", str(output_dir))
        try:
            receipt = _pull(backend, ctx, output_dir)
        except Exception as exc:
            keep_machine = True
            raise PullFailed(redact(f"run {run_id}: training finished but its outputs did not come back: "
                                    f"{getattr(exc, 'message', exc)}"), _retry_pull_hint(run_id)) from exc
        receipt.update(run_id=run_id, backend=backend.name, machine=ctx.machine,
                       wall_seconds=round(time.time() - started, 1), output_dir=str(output_dir))
        if estimate:
            receipt["estimate"] = estimate
            receipt["actual_cost"] = _actual_cost(estimate, receipt["wall_seconds"])
        (output_dir / "receipt.json").write_text(json.dumps(receipt, indent=1))
        ledger.update_run(run_id, tokens=receipt.get("tokens"), train_seconds=receipt.get("train_seconds"),
                          wall_seconds=receipt["wall_seconds"], gpu=receipt.get("device"),
                          actual_cost=_actual_cost(estimate, receipt["wall_seconds"]))
        status = "succeeded"
        return RunResult(run_id=run_id, status=status, receipt=receipt)
    except KeyboardInterrupt:
        status = "cancelled"
        events.warn(f"interrupted: stopping run {run_id}")
        backend.stop(ctx)
        raise
    except BaseException as exc:
        ledger.update_run(run_id, error=redact(str(exc))[:4000])
        raise
    finally:
        ledger.update_run(run_id, status=status, wall_seconds=round(time.time() - started, 1))
        if keep_machine:
            ledger.set_machine(ctx.machine, "up", pull_failed=True)
            events.warn(f"{ctx.machine} is left up with the outputs on it. " + _retry_pull_hint(run_id))
        else:
            _teardown(backend, ctx, ledger, events)


def _retry_pull_hint(run_id: str) -> str:
    return (f"Fetch them with `cloudtune pull {run_id}` (it tears the machine down afterwards), or give them up "
            f"with `cloudtune down {run_id}`. A cloud machine also tears itself down after compute.autostop_minutes "
            f"idle, outputs and all.")


def pull_again(run: dict, backend: Backend, events: Events | None = None, *, ledger: Ledger | None = None) -> RunResult:
    """`cloudtune pull RUN`: fetch the outputs of a run whose pull failed, then tear its machine down."""
    events = events or Events()
    ledger = ledger or Ledger()
    machine = ledger.machine_for_run(run["id"])
    if machine is None or machine["status"] == "terminated":
        raise CloudtuneError(f"run {run['id']}: its machine is gone, and its outputs with it.",
                             "`cloudtune status` shows the runs whose outputs arrived.")
    ctx = context_for(run)
    ctx.meta.update(machine["meta"])
    output_dir = Path(run["output_dir"])
    events.phase("pull", str(output_dir))
    receipt = _pull(backend, ctx, output_dir)  # a failure leaves the machine as it is, for another try
    receipt.update(run_id=run["id"], backend=backend.name, machine=ctx.machine, wall_seconds=run["wall_seconds"],
                   output_dir=str(output_dir))
    if _estimate_columns(run):
        receipt["estimate"] = _estimate_columns(run)
    (output_dir / "receipt.json").write_text(json.dumps(receipt, indent=1))
    ledger.update_run(run["id"], status="succeeded", error=None, tokens=receipt.get("tokens"),
                      train_seconds=receipt.get("train_seconds"), gpu=receipt.get("device"))
    _teardown(backend, ctx, ledger, events)
    return RunResult(run_id=run["id"], status="succeeded", receipt=receipt)


def _pull(backend: Backend, ctx: RunContext, output_dir: Path) -> dict[str, Any]:
    staging = ctx.work_dir / "pulled"
    shutil.rmtree(staging, ignore_errors=True)
    backend.pull(ctx, staging)
    files = manifest.read_manifest(staging / manifest.MANIFEST)
    manifest.install(staging, files, output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    run = json.loads((output_dir / "run.json").read_text())
    return {**run, "weights_path": str(output_dir / run["weights_dir"])}


def _teardown(backend: Backend, ctx: RunContext, ledger: Ledger, events: Events) -> None:
    ledger.set_machine(ctx.machine, "terminating")
    events.phase("teardown", ctx.machine)
    for attempt in (1, 2):
        try:
            verified = backend.teardown(ctx)
            break
        except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more; say what is left
            ledger.set_machine(ctx.machine, "unknown")
            events.warn(f"tearing down {ctx.machine} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                        f"run `cloudtune down {ctx.run_id}`")
            return
        except KeyboardInterrupt:
            if attempt == 2:
                ledger.set_machine(ctx.machine, "unknown")
                events.warn(f"teardown of {ctx.machine} interrupted; it may still be running. "
                            f"Run `cloudtune down {ctx.run_id}`.")
                raise
            events.warn(f"still tearing down {ctx.machine}; interrupt again to leave it "
                        f"(then `cloudtune down {ctx.run_id}` removes it)")
    ledger.set_machine(ctx.machine, "terminated" if verified else "unknown")
    if not verified:
        events.warn(f"could not verify that {ctx.machine} is gone; run `cloudtune down {ctx.run_id}`")


def _estimate_columns(estimate: dict[str, Any] | None) -> dict[str, Any]:
    if not estimate:
        return {}
    keys = ("gpu", "price_per_hour", "est_hours_low", "est_hours_high", "est_cost_low", "est_cost_high")
    return {key: estimate.get(key) for key in keys if estimate.get(key) is not None}


def _actual_cost(estimate: dict[str, Any] | None, wall_seconds: float) -> float | None:
    if not estimate or estimate.get("price_per_hour") is None:
        return None
    return round(estimate["price_per_hour"] * wall_seconds / 3600, 4)
