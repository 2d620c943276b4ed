"""Finding and removing every machine cloudtune started, from the ledger (`cloudtune down`).

SkyPilot's own cluster list is read too (clusters named `ct-...`): it still knows a cluster when
the ledger lost track of it.
"""
from __future__ import annotations

from collections.abc import Callable

from .backends import get_backend
from .backends.base import Backend, RunContext
from .errors import CloudtuneError
from .ledger import Ledger
from .paths import runs_dir
from .runner import context_for

CLOUD_BACKEND = "skypilot"


def find_machines(run_ref: str | None, ledger: Ledger | None = None, *,
                  backend_for: Callable[[str], Backend] = get_backend, problems: list[str] | None = None) -> list[dict]:
    """Machines not yet verified gone: all of them, or the one of a run."""
    ledger = ledger or Ledger()
    if run_ref is None:
        machines = ledger.machines()
        return machines + cloud_clusters(ledger, machines, backend_for, problems)
    run = ledger.get_run(run_ref)
    machine = ledger.machine_for_run(run["id"])
    return [machine] if machine and machine["status"] != "terminated" else []


def cloud_clusters(ledger: Ledger, known: list[dict], backend_for: Callable[[str], Backend],
                   problems: list[str] | None = None) -> list[dict]:
    """SkyPilot clusters cloudtune named that the ledger does not list as live.

    Asked only once cloudtune has used SkyPilot here: the question starts SkyPilot's API server.
    """
    rows = {row["name"]: row for row in ledger.machines(include_terminated=True)}
    if not any(row["backend"] == CLOUD_BACKEND for row in rows.values()):
        return []
    try:
        clusters = backend_for(CLOUD_BACKEND).clusters()
    except Exception as exc:  # noqa: BLE001 - an unreachable API server must not block tearing down the rest
        if problems is not None:
            problems.append(f"could not list SkyPilot's clusters ({type(exc).__name__}: {str(exc)[:300]}); "
                            "run `sky status` to check for ct-... clusters")
        return []
    known_names = {machine["name"] for machine in known}
    found = []
    for name, status in sorted(clusters.items()):
        if name in known_names:
            continue
        row = rows.get(name)
        found.append({"name": name, "run_id": row["run_id"] if row else name.removeprefix("ct-"),
                      "backend": CLOUD_BACKEND, "status": f"{status} in SkyPilot", "meta": row["meta"] if row else {}})
    return found


def tear_down(machines: list[dict], ledger: Ledger | None = None, *,
              backend_for: Callable[[str], Backend] = get_backend) -> list[tuple[str, bool]]:
    ledger = ledger or Ledger()
    results = []
    for machine in machines:
        try:
            run = ledger.get_run(machine["run_id"])
        except CloudtuneError:  # a cluster the ledger never saw: nothing to rebuild but its name
            run = None
        ctx = context_for(run) if run else RunContext(run_id=machine["run_id"], machine=machine["name"],
                                                       work_dir=runs_dir() / machine["run_id"])
        ctx.meta.update(machine["meta"])
        backend = backend_for(machine["backend"])
        ledger.set_machine(machine["name"], "terminating")
        backend.stop(ctx)
        verified = backend.teardown(ctx)
        ledger.set_machine(machine["name"], "terminated" if verified else "unknown")
        if run and verified and run["status"] not in ("succeeded", "failed", "cancelled"):
            ledger.update_run(run["id"], status="cancelled", error="torn down by `cloudtune down`")
        results.append((machine["name"], verified))
    return results
