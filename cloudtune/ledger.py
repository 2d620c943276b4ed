"""The ledger: one SQLite file (WAL) of every run and every machine cloudtune asked for.

A machine gets its row BEFORE it is requested, so `cloudtune down` can always find it, even when
the CLI that asked for it was killed.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CloudtuneError
from .paths import home
from .secrets import redact

RUN_STATUSES = ("planned", "provisioning", "syncing", "running", "pulling", "succeeded", "failed", "cancelled")
FINAL_RUN_STATUSES = ("succeeded", "failed", "cancelled")
LEDGER_FILE = "ledger.db"
MAX_ERROR_CHARS = 4000
MACHINE_STATUSES = ("requested", "up", "terminating", "terminated", "unknown")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    recipe_path TEXT,
    recipe_hash TEXT,
    backend TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    output_dir TEXT,
    gpu TEXT,
    price_per_hour REAL,
    est_hours_low REAL,
    est_hours_high REAL,
    est_cost_low REAL,
    est_cost_high REAL,
    tokens INTEGER,
    train_seconds REAL,
    wall_seconds REAL,
    actual_cost REAL,
    error TEXT,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS machines (
    name TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    backend TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    terminated_at REAL,
    meta TEXT NOT NULL DEFAULT '{}'
);
"""

RUN_COLUMNS = ("name", "recipe_path", "recipe_hash", "backend", "status", "finished_at", "output_dir", "gpu",
               "price_per_hour", "est_hours_low", "est_hours_high", "est_cost_low", "est_cost_high", "tokens",
               "train_seconds", "wall_seconds", "actual_cost", "error")


RUN_ID_ATTEMPTS = 20


def new_run_id() -> str:
    """Sortable by time, valid in every cloud's cluster-name rules; 24 random bits make two laptops'
    runs of the same second collide once in 16 million (one ledger never lets them: see add_new_run)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def machine_name(run_id: str) -> str:
    return f"ct-{run_id}"


class LedgerError(CloudtuneError):
    """The ledger could not be read or written (a full disk, a locked or damaged file)."""


class _Guarded:
    """The SQLite connection, with its errors turned into one message: a full disk under CLOUDTUNE_HOME
    must read as that, not as a traceback from deep inside a run."""

    def __init__(self, path: Path):
        self.path = path
        self._db = self._guard(lambda: sqlite3.connect(path, timeout=30, isolation_level=None))
        self._db.row_factory = sqlite3.Row

    def execute(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        return self._guard(lambda: self._db.execute(sql, params).fetchall())

    def executescript(self, sql: str) -> None:
        self._guard(lambda: self._db.executescript(sql))

    def close(self) -> None:
        self._db.close()

    def _guard(self, action):
        try:
            return action()
        except sqlite3.IntegrityError:  # a bug in the caller (a duplicate id), not the ledger's state
            raise
        except sqlite3.Error as exc:
            raise LedgerError(f"the ledger {self.path} cannot be used: {exc}.",
                              f"Free space where CLOUDTUNE_HOME is ({self.path.parent}) and check that it can be "
                              "written, then try again. A run that was going on is recorded when the next command "
                              "can write there; `cloudtune down` finds its machine.") from None


class Ledger:
    def __init__(self, path: Path | None = None):
        self.path = path or home() / LEDGER_FILE
        self._db = _Guarded(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[_Guarded]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            with contextlib.suppress(LedgerError):  # the transaction's own error is the one to report
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # runs ---------------------------------------------------------------------------------------

    def add_run(self, run_id: str, *, name: str, backend: str, recipe_path: str | None = None,
                recipe_hash: str | None = None, **fields: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO runs (id, name, backend, recipe_path, recipe_hash, status, created_at) "
                       "VALUES (?, ?, ?, ?, ?, 'planned', ?)",
                       (run_id, name, backend, recipe_path, recipe_hash, time.time()))
        if fields:
            self.update_run(run_id, **fields)

    def add_new_run(self, *, name: str, backend: str, **fields: Any) -> str:
        """A new run under an id no other run in this ledger has; returns the id."""
        for _ in range(RUN_ID_ATTEMPTS):
            run_id = new_run_id()
            try:
                self.add_run(run_id, name=name, backend=backend, **fields)
            except sqlite3.IntegrityError:
                continue
            return run_id
        raise CloudtuneError(f"could not find a free run id in {self.path} after {RUN_ID_ATTEMPTS} tries.",
                             "Is the system clock stuck? Try again in a second.")

    def update_run(self, run_id: str, *, meta: dict | None = None, **fields: Any) -> None:
        unknown = set(fields) - set(RUN_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run columns: {sorted(unknown)}")
        if fields.get("error"):  # error text quotes logs and user data: redacted whole, then cut
            fields["error"] = redact(str(fields["error"]))[:MAX_ERROR_CHARS]
        if fields.get("status") in FINAL_RUN_STATUSES and "finished_at" not in fields:
            fields["finished_at"] = time.time()
        with self._tx() as db:
            if fields:
                assignments = ", ".join(f"{column} = ?" for column in fields)
                db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))
            if meta:
                current = json.loads(db.execute("SELECT meta FROM runs WHERE id = ?", (run_id,))[0][0])
                db.execute("UPDATE runs SET meta = ? WHERE id = ?", (json.dumps({**current, **meta}), run_id))

    def get_run(self, ref: str) -> dict:
        """A run by id or unique id prefix (or 'last')."""
        if ref == "last":
            rows = self._db.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT 1")
        else:
            rows = self._db.execute("SELECT * FROM runs WHERE id = ? OR id LIKE ? ORDER BY created_at DESC",
                                    (ref, ref + "%"))
        if not rows:
            raise CloudtuneError(f"no run '{ref}' in the ledger ({self.path}).", "See `cloudtune status` for run ids.")
        exact = [row for row in rows if row["id"] == ref]
        if len(rows) > 1 and not exact:
            raise CloudtuneError(f"'{ref}' matches {len(rows)} runs.", "Give more of the run id.")
        return _as_dict((exact or rows)[0])

    def runs(self, limit: int = 20) -> list[dict]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_as_dict(row) for row in rows]

    # machines -----------------------------------------------------------------------------------

    def add_machine(self, name: str, run_id: str, backend: str, **meta: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO machines (name, run_id, backend, status, created_at, meta) "
                       "VALUES (?, ?, ?, 'requested', ?, ?)", (name, run_id, backend, time.time(), json.dumps(meta)))

    def set_machine(self, name: str, status: str, **meta: Any) -> None:
        if status not in MACHINE_STATUSES:
            raise ValueError(f"unknown machine status {status}")
        with self._tx() as db:
            row = next(iter(db.execute("SELECT meta FROM machines WHERE name = ?", (name,))), None)
            merged = {**json.loads(row[0]), **meta} if row else meta
            db.execute("UPDATE machines SET status = ?, meta = ?, terminated_at = ? WHERE name = ?",
                       (status, json.dumps(merged), time.time() if status == "terminated" else None, name))

    def machines(self, include_terminated: bool = False) -> list[dict]:
        query = "SELECT * FROM machines"
        if not include_terminated:
            query += " WHERE status != 'terminated'"
        rows = self._db.execute(query + " ORDER BY created_at")
        return [_as_dict(row) for row in rows]

    def unfinished_machines(self) -> list[dict]:
        """Machines not yet terminated whose run has no final status: live runs, and runs whose CLI died."""
        marks = ", ".join("?" for _ in FINAL_RUN_STATUSES)
        rows = self._db.execute("SELECT machines.* FROM machines JOIN runs ON runs.id = machines.run_id "
                                f"WHERE machines.status != 'terminated' AND runs.status NOT IN ({marks})",
                                FINAL_RUN_STATUSES)
        return [_as_dict(row) for row in rows]

    def machine_for_run(self, run_id: str) -> dict | None:
        row = next(iter(self._db.execute("SELECT * FROM machines WHERE run_id = ?", (run_id,))), None)
        return _as_dict(row) if row else None


def _as_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["meta"] = json.loads(out.get("meta") or "{}")
    return out
