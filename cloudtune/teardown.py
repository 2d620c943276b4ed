"""Finding and removing every machine cloudtune started, from the ledger (`cloudtune down`)."""
from __future__ import annotations

from .backends import get_backend
from .ledger import Ledger
from .runner import context_for


def find_machines(run_ref: str | None, ledger: Ledger | None = None) -> list[dict]:
    """Machines not yet verified gone: all of them, or the one of a run."""
    ledger = ledger or Ledger()
    if run_ref is None:
        return ledger.machines()
    run = ledger.get_run(run_ref)
    machine = ledger.machine_for_run(run["id"])
    return [machine] if machine and machine["status"] != "terminated" else []


def tear_down(machines: list[dict], ledger: Ledger | None = None) -> list[tuple[str, bool]]:
    ledger = ledger or Ledger()
    results = []
    for machine in machines:
        run = ledger.get_run(machine["run_id"])
        ctx = context_for(run)
        ctx.meta.update(machine["meta"])
        backend = get_backend(machine["backend"])
        ledger.set_machine(machine["name"], "terminating")
        backend.stop(ctx)
        verified = backend.teardown(ctx)
        ledger.set_machine(machine["name"], "terminated" if verified else "unknown")
        if verified and run["status"] not in ("succeeded", "failed", "cancelled"):
            ledger.update_run(run["id"], status="cancelled", error="torn down by `cloudtune down`")
        results.append((machine["name"], verified))
    return results
