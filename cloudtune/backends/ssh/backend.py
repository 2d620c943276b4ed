"""The SSH backend: train on any machine you can log in to (a marketplace box, a lab server).

This module maps the Backend lifecycle onto the pieces beside it: transport (the connection),
transfer (files), remote_env (the machine's Python or a Docker container) and the programs in
scripts/. The training runs detached in its own session (or container), writing its log and exit
status to files, so losing the connection loses nothing: the log is re-read from the last byte seen,
and `cloudtune logs RUN -f` / `cloudtune down RUN` rebuild everything from the run's SSHState (the ledger).

On the machine, under the remote root (default ~/.cloudtune/remote):
  bundles/<sha256>.tar.gz   uploaded once per distinct bundle (`.part` while an upload is unfinished)
  envs/<hash>/              a venv per requirement set, kept for later runs (envs/docker-<hash>/ over an image)
  runs/<run id>/            bundle/ unpacked, site/ (this run's cloudtune), secrets.env (0600),
                            train.log, exit_code, pid, out/
  models/                   the training's CLOUDTUNE_HOME cache (the tiny demo model)
  home/                     HOME inside Docker containers (caches of the hub and pip)
"""
from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

from ... import manifest
from ...errors import CloudtuneError
from ...events import Events
from ...remote import checkpoints
from ...wheel import build_wheel, train_requirements
from ..base import EXIT_FILE, LOG_FILE, SECRETS_FILE, Backend, Bundle, RunContext, secrets_env
from ..capabilities import KeepsCheckpoints
from ..common import LogCopy, bundle_wheel, saved_log, tail
from . import commands, remote_env, transfer
from .commands import MARK
from .options import SSHOptions
from .remote_env import ENVS, MIN_PYTHON, STOP_GRACE_SECONDS, RemoteEnv
from .state import SSHState
from .transport import Connection, Target, known_hosts_path, parse_host

DEFAULT_REMOTE_ROOT = "~/.cloudtune/remote"
REMOTE_PYTHON_ENV = "CLOUDTUNE_REMOTE_PYTHON"
REMOTE_ROOT_ENV = "CLOUDTUNE_REMOTE_ROOT"
RECONNECT_SECONDS = 120  # a log stream keeps retrying this long; the training goes on regardless
POLL_SECONDS = 0.5
LIVENESS_SECONDS = 5.0  # between process checks (the exit_code file, which is cheaper, is checked every poll)
# Bundles are unpacked into each run's directory, so only a re-run of the same bundle reads one again:
# the newest few stay for that, older ones (and uploads abandoned over a day ago) go at teardown.
KEEP_BUNDLES = 3


class SSHBackend(Backend, KeepsCheckpoints):
    name = "ssh"
    Options = SSHOptions
    State = SSHState

    def __init__(self, options: SSHOptions | None = None, events: Events | None = None, *,
                 known_hosts: str | Path | None = None, remote_python: str | None = None,
                 remote_root: str | None = None):
        super().__init__(options, events)
        # All of these go into the run's state at provision; a backend rebuilt by `logs`/`down` reads them there.
        self.address = parse_host(self.options.host) if self.options.host else None
        self.key = str(Path(self.options.key).expanduser().resolve()) if self.options.key else None
        self.known_hosts = known_hosts_path(known_hosts)
        self.remote_python = remote_python or os.environ.get(REMOTE_PYTHON_ENV) or ""
        self.remote_root = remote_root or os.environ.get(REMOTE_ROOT_ENV) or DEFAULT_REMOTE_ROOT
        self.connection: Connection | None = None
        self._secrets: dict[str, str] = {}
        self._wheel: Path | None = None

    # -- the connection and the environment, each reached through one place ------------------------------
    # The run's SSHState is ctx.state: the lifecycle writes it to the ledger after each phase.

    def _conn(self, state: SSHState, run_id: str) -> Connection:
        if state.host is None:
            raise CloudtuneError(f"run {run_id} has no SSH address in the ledger: it stopped before connecting.")
        target = Target(state.user, state.host, state.port, state.key, Path(state.known_hosts),
                        self.options.trust_new_host)
        if self.connection is None or self.connection.target != target:
            if self.connection is not None:
                self.connection.close()
            self.connection = Connection(target, self._warn)
        return self.connection

    def _warn(self, message: str) -> None:
        self.events.warn(message)  # looked up at each call: a test may swap the events after construction

    def environment(self, ctx: RunContext) -> RemoteEnv:
        """Where this run trains: its Python or its container."""
        return remote_env.environment(self._conn(ctx.state, ctx.run_id), ctx.state, self.events)

    def _disconnect(self) -> None:
        if self.connection is not None:
            self.connection.close()

    # -- the Backend protocol ----------------------------------------------------------------------------

    def provision(self, ctx: RunContext) -> None:
        if self.address is None:
            raise CloudtuneError("the ssh backend needs a machine: --host user@ip[:port].")
        user, host, port = self.address
        state = ctx.state
        state.user, state.host, state.port, state.key = user, host, port, self.key
        state.known_hosts, state.keep_remote = str(self.known_hosts), self.options.keep_remote
        self._probe(ctx, state)
        if ctx.recipe is not None:
            compute = ctx.recipe.compute
            chosen = ENVS[compute.remote_env](self._conn(state, ctx.run_id), state, self.events)
            chosen.setup(ctx.run_id, compute.image)

    def _probe(self, ctx: RunContext, state: SSHState) -> None:
        """Find the machine's Python and make the run's directory, in one round trip."""
        conn = self._conn(state, ctx.run_id)
        _, output = conn.run(commands.sh("probe.sh", MARK, self.remote_python, commands.source("probe.py"),
                                         self.remote_root, ctx.run_id, *MIN_PYTHON), check=False)
        found = commands.marked(output)
        wanted = f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
        if found is None:
            raise CloudtuneError(f"could not look for Python on {conn.where}:\n{output[-2000:]}")
        if found == "no-python":
            why = f"{self.remote_python} is not there" if self.remote_python else \
                "neither python3 nor python is on the login PATH"
            raise CloudtuneError(f"{state.host} has no usable Python: {why}.",
                                 f"Install Python >= {wanted} there (e.g. `apt-get install -y python3 python3-venv "
                                 f"python3-pip`), or name one with {REMOTE_PYTHON_ENV}=/path.")
        probe = json.loads(found)
        if probe["run"] is None:
            raise CloudtuneError(f"{state.host}: {probe['python']} is Python {probe['version']}; the training needs "
                                 f">= {wanted}.",
                                 f"Install a newer Python there, or name one with {REMOTE_PYTHON_ENV}=/path.")
        state.base_python, state.remote_root, state.remote_dir = probe["python"], probe["root"], probe["run"]
        self.events.phase("connected", f"{conn.where}, Python {probe['version']} ({probe['python']})")

    def bundle_files(self, ctx: RunContext) -> dict[str, Path]:
        self._wheel = build_wheel()
        return {self._wheel.name: self._wheel}

    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        self._secrets = dict(secrets)
        wheel = bundle_wheel(bundle)
        state = ctx.state
        conn, run = self._conn(state, ctx.run_id), state.remote_dir
        archive = f"{state.remote_root}/bundles/{bundle.sha256}.tar.gz"
        events = self.events
        transfer.upload_verified(conn, bundle.path, bundle.sha256, archive, progress=events.progress,
                                 phase=events.phase, warn=events.warn)
        if secrets:
            transfer.write_private(conn, f"{run}/{SECRETS_FILE}", secrets_env(secrets))
        conn.run(shlex.join(["tar", "-xzf", archive, "-C", run]))
        env = self.environment(ctx)
        python = env.prepare(train_requirements(self._wheel or build_wheel()))
        env.install(python, f"{run}/bundle/{wheel}", f"{run}/site")
        state.remote_python = python

    def start(self, ctx: RunContext, resume: bool = False) -> None:
        state = ctx.state
        run = state.remote_dir
        env = {"CLOUDTUNE_PYTHON": state.remote_python, "CLOUDTUNE_HOME": state.remote_root,
               "PYTHONPATH": f"{run}/site", "PYTHONUNBUFFERED": "1", **ctx.train_env}
        self.environment(ctx).start(env, resume)

    def exit_code(self, ctx: RunContext) -> int | None:
        state = ctx.state
        conn = self._conn(state, ctx.run_id)
        for _ in range(10):
            try:
                text = transfer.read_text(conn, f"{state.remote_dir}/{EXIT_FILE}").strip()
            except FileNotFoundError:
                return None
            if text:
                return int(text) if text.lstrip("-").isdigit() else None
            time.sleep(0.1)  # caught between the shell creating the file and writing the status
        return None

    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        state = ctx.state
        if state.remote_dir is None:
            return
        try:
            yield from tail(_LogPoller(self, ctx, state, follow), follow, POLL_SECONDS)
        except FileNotFoundError:
            yield from saved_log(ctx)  # the run's directory is gone: show the copy taken at teardown

    def pull(self, ctx: RunContext, staging: Path) -> None:
        state = ctx.state
        out = f"{state.remote_dir}/out"
        transfer.download_tree(self._conn(state, ctx.run_id), out, staging, self.events.progress,
                               skip=manifest.NOT_PULLED)
        try:
            manifest.verify(staging, manifest.read_manifest(staging / manifest.MANIFEST))
        except CloudtuneError as exc:
            state.keep_remote = True  # the machine holds the only copy now: teardown must not delete it
            raise CloudtuneError(exc.message, f"Nothing was moved into your output directory. The outputs stay on "
                                              f"{state.where} in {out} for you to inspect.") from None

    def fetch_checkpoint(self, ctx: RunContext, dest: Path) -> Path | None:
        state = ctx.state
        if not state.started or state.host is None:
            return None
        conn = self._conn(state, ctx.run_id)
        root = f"{state.remote_dir}/out/{checkpoints.CHECKPOINTS}"
        if not transfer.exists(conn, root):
            return None
        names = sorted(name for name in conn.files().listdir(root) if name.startswith(checkpoints.STEP_PREFIX))
        newest = next((n for n in reversed(names) if transfer.exists(conn, f"{root}/{n}/{checkpoints.COMPLETE}")), None)
        if newest is None:
            return None
        transfer.download_tree(conn, f"{root}/{newest}", dest / newest, self.events.progress)
        return dest / newest

    def stop(self, ctx: RunContext) -> None:
        state = ctx.state
        if not state.started or state.host is None:
            return
        env = self.environment(ctx)
        try:
            env.stop()
        except Exception as exc:  # noqa: BLE001 - stopping is best effort; teardown verifies and reports
            if not isinstance(exc, CloudtuneError) and not env.conn.lost(exc):
                raise
            self.events.warn(f"could not stop the training on {state.host}: {exc}")

    def remove_secrets(self, ctx: RunContext) -> None:
        state = ctx.state
        if not state.remote_dir or state.host is None:
            return
        conn = self._conn(state, ctx.run_id)
        try:
            conn.run(shlex.join(["rm", "-f", "--", f"{state.remote_dir}/{SECRETS_FILE}"]), check=False)
        except Exception as exc:  # noqa: BLE001 - teardown removes the whole run directory, secrets included
            if not isinstance(exc, CloudtuneError) and not conn.lost(exc):
                raise
            self.events.warn(f"could not remove the secrets file on {state.host} yet ({exc}); teardown will")

    def teardown(self, ctx: RunContext) -> bool:
        state = ctx.state
        if not state.remote_dir:
            return True  # provisioning never got as far as creating anything on the machine
        env = self.environment(ctx)
        try:
            self._save_log(env.conn, ctx, state)
            # One round trip: stop what still runs, remove the run's files, report both.
            # --keep-remote keeps the outputs and the log, never the secrets or the copy of the dataset
            doomed = ([f"{state.remote_dir}/{SECRETS_FILE}", f"{state.remote_dir}/bundle"] if state.keep_remote
                      else [state.remote_dir])
            steps = [env.stop_command(STOP_GRACE_SECONDS)] if state.started else []
            steps.append(commands.sh("cleanup.sh", MARK, f"{state.remote_root}/bundles", KEEP_BUNDLES, *doomed))
            _, output = env.conn.run("\n".join(steps), check=False)
            said = commands.marks(output)
            return said[-1:] == ["removed"] and "alive" not in said
        except Exception as exc:  # noqa: BLE001 - reported as "not verified", and `cloudtune down` can retry
            if not isinstance(exc, CloudtuneError) and not env.conn.lost(exc):
                raise
            self.events.warn(f"could not clean up on {state.host}: {exc}")
            return False
        finally:
            self._disconnect()

    def _save_log(self, conn: Connection, ctx: RunContext, state: SSHState) -> None:
        """Keep a (redacted) copy of the training log here, for `cloudtune logs` once the machine forgets it."""
        try:
            text = transfer.read_text(conn, f"{state.remote_dir}/{LOG_FILE}")
        except FileNotFoundError:
            return
        LogCopy(ctx, self._secrets).write_text(text)


class _LogPoller:
    """One poll of the remote log for common.tail: (finished, new bytes), reconnecting when the connection
    drops, for up to RECONNECT_SECONDS; the training goes on meanwhile."""

    def __init__(self, backend: SSHBackend, ctx: RunContext, state: SSHState, follow: bool):
        self.backend, self.ctx, self.state, self.follow = backend, ctx, state, follow
        self.env = backend.environment(ctx)
        self.path = f"{state.remote_dir}/{LOG_FILE}"
        self.checked_process = 0.0

    def __call__(self, offset: int) -> tuple[bool, bytes]:
        lost_since = None
        while True:
            try:
                return self._poll(offset)
            except FileNotFoundError:
                raise
            except Exception as exc:
                if not self.env.conn.lost(exc):
                    raise
                self.env.conn.close()
                lost_since = lost_since or time.time()
                self._give_up_after(lost_since, exc)
                self.backend.events.warn(f"connection to {self.state.host} lost ({exc or 'EOF'}); "
                                          "reconnecting to resume the log")
                time.sleep(min(5.0, 1 + (time.time() - lost_since) / 4))

    def _poll(self, offset: int) -> tuple[bool, bytes]:
        check_process = self.follow and time.time() - self.checked_process > LIVENESS_SECONDS
        finished = self._finished(check_process)
        if check_process:
            self.checked_process = time.time()
        return finished, transfer.read_from(self.env.conn, self.path, offset, self.state.remote_dir)

    def _finished(self, check_process: bool) -> bool:
        if transfer.exists(self.env.conn, f"{self.state.remote_dir}/{EXIT_FILE}"):
            return True
        if not check_process:
            return False
        return not self.state.started or not self.env.alive()

    def _give_up_after(self, lost_since: float, exc: Exception) -> None:
        if time.time() - lost_since > RECONNECT_SECONDS:
            run_id = self.ctx.run_id
            raise CloudtuneError(
                f"lost the connection to {self.state.where} and could not get it back within "
                f"{RECONNECT_SECONDS} s ({exc or 'EOF'}).",
                f"Once the machine answers again, `cloudtune logs {run_id} -f` reattaches to the "
                f"training and `cloudtune down {run_id}` stops it and cleans up.") from None

