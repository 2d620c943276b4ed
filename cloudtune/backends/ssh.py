"""The SSH backend: train on any machine you can log in to (a marketplace box, a lab server).

paramiko is imported here and nowhere else. Host keys are checked against known_hosts and a changed
key is never accepted. The training runs detached in its own session (setsid), writing its log and
exit status to files, so losing the connection loses nothing: the log is re-read from the last byte
seen, and `cloudtune logs RUN -f` / `cloudtune down RUN` rebuild everything from _meta(ctx) (the ledger).

On the machine, under the remote root (default ~/.cloudtune/remote):
  bundles/<sha256>.tar.gz   uploaded once per distinct bundle (`.part` while an upload is unfinished)
  envs/<hash>/              a venv per requirement set, kept for later runs
  runs/<run id>/            bundle/ unpacked, site/ (this run's cloudtune), secrets.env (0600),
                            train.log, exit_code, pid, out/
  models/                   the training's CLOUDTUNE_HOME cache (the tiny demo model)
  home/                     HOME inside Docker containers (caches of the hub and pip)

With `compute.remote_env: docker` the training runs in a container of `compute.image` instead of the
machine's Python: the remote root is mounted at the same path, so every path above reads the same
inside and out, and the container runs as the login user, so everything it writes stays removable.
Packages the image lacks go into envs/docker-<hash>/, built once with the image's own pip. The
machine's Python still runs the small control scripts (probe, liveness).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import shlex
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko

from .. import manifest
from ..errors import CloudtuneError
from ..events import Events
from ..secrets import Redactor
from ..wheel import build_wheel, train_requirements
from .base import EXIT_FILE, LOG_FILE, Backend, Bundle, MachineState, RunContext, secrets_env
from .ssh_options import SSHOptions

DEFAULT_REMOTE_ROOT = "~/.cloudtune/remote"
KNOWN_HOSTS_ENV = "CLOUDTUNE_KNOWN_HOSTS"
REMOTE_PYTHON_ENV = "CLOUDTUNE_REMOTE_PYTHON"
REMOTE_ROOT_ENV = "CLOUDTUNE_REMOTE_ROOT"
MIN_PYTHON = (3, 10)
CONNECT_TIMEOUT = 15
UPLOAD_CHUNK = 256 * 1024
TRANSFER_ATTEMPTS = 3
RECONNECT_SECONDS = 120  # a log stream keeps retrying this long; the training goes on regardless
POLL_SECONDS = 0.5
LIVENESS_SECONDS = 5.0  # between process checks (the exit_code file, which is cheaper, is checked every poll)
STOP_GRACE_SECONDS = 10
CONTAINER_PREFIX = "cloudtune-"
# Bundles are unpacked into each run's directory, so only a re-run of the same bundle reads one again:
# the newest few stay for that, older ones (and uploads abandoned over a day ago) go at teardown.
KEEP_BUNDLES = 3
MARK = "CLOUDTUNE:"  # prefixes the lines we parse, so a chatty login shell cannot confuse us

# Finds the interpreter and makes the run directory in one round trip. Written for any Python, so an
# old one can still say which version it is.
PROBE_SCRIPT = """
PY={python}
if [ -z "$PY" ]; then PY=$(command -v python3 || command -v python); fi
if [ -z "$PY" ] || ! command -v "$PY" >/dev/null 2>&1; then echo "{mark}no-python"; exit 0; fi
exec "$PY" -c {code} {root} {run_id}
"""
PROBE_CODE = """
import json, os, sys
root = os.path.realpath(os.path.expanduser(sys.argv[1]))
run = os.path.join(root, "runs", sys.argv[2])
ok = sys.version_info >= ({major}, {minor})
if ok and not os.path.isdir(run):
    os.makedirs(run, 0o700)
if ok and not os.path.isdir(os.path.join(root, "bundles")):
    os.makedirs(os.path.join(root, "bundles"))
print("{mark}" + json.dumps({{"python": sys.executable, "version": "%d.%d.%d" % tuple(sys.version_info[:3]),
                              "root": root, "run": run if ok else None}}))
"""
# Which of the training requirements this interpreter lacks (markers evaluated on the machine).
MISSING_CODE = r"""
import json, re, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None
missing = []
for text in json.loads(sys.argv[2]):
    if Requirement is None:
        name, req = re.split(r"[\s\[<>=!~;(]", text, maxsplit=1)[0], None
    else:
        req = Requirement(text)
        name = req.name
        if req.marker is not None and not req.marker.evaluate():
            continue
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(text)
        continue
    if req is not None and not req.specifier.contains(version, prereleases=True):
        missing.append(text)
print(sys.argv[1] + json.dumps(missing))
"""
# Builds a venv for one requirement set, once: a lock serialises concurrent runs, `.ready` marks success.
VENV_CODE = """
import fcntl, json, os, shutil, subprocess, sys
venv, requirements = sys.argv[2], json.loads(sys.argv[3])
os.makedirs(os.path.dirname(venv), exist_ok=True)
with open(venv + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(venv, ".ready")):
        shutil.rmtree(venv, ignore_errors=True)
        # System site-packages stay visible, so a torch that came with the machine is reused.
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--progress-bar", "off",
                        "--disable-pip-version-check"] + requirements, check=True)
        open(os.path.join(venv, ".ready"), "w").close()
print(sys.argv[1] + os.path.join(venv, "bin", "python"))
"""
# Stops (or, with grace "check", only looks at) the training's process group. Python rather than
# `ps`, which slim container images lack; zombies do not count as running.
GROUP_CODE = """
import os, signal, sys, time
mark, pgid, grace = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def alive():
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return True
        except OSError:
            return False
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % pid) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
def send(sig):
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass
if grace != "check" and alive():
    send(signal.SIGTERM)
    deadline = time.time() + float(grace)
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    if alive():
        send(signal.SIGKILL)
        time.sleep(0.5)
print(mark + ("alive" if alive() else "gone"))
"""


class Unreachable(CloudtuneError):
    """The machine did not answer: worth retrying, unlike a refused key or a changed host key."""


def parse_host(text: str) -> tuple[str, str, int]:
    """`user@host[:port]` (also `ssh://...` and `[ipv6]:port`) -> (user, host, port)."""
    spec = text.strip().removeprefix("ssh://")
    user, _, hostport = spec.rpartition("@")
    port = ""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host = hostport
    if not host or (port and not port.isdigit()) or not 0 < int(port or 22) < 65536 or "/" in host:
        raise CloudtuneError(f"--host '{text}' is not an SSH address.", "Write it as user@ip or user@ip:port.")
    return user or getpass.getuser(), host, int(port or 22)


def known_hosts_path(path: str | Path | None = None) -> Path:
    chosen = path or os.environ.get(KNOWN_HOSTS_ENV) or Path.home() / ".ssh" / "known_hosts"
    return Path(chosen).expanduser().resolve()


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown hosts are refused unless the user said to trust them; trusted ones are appended to known_hosts."""

    def __init__(self, known_hosts: Path, trust_new_host: bool, note: Callable[[str], None]):
        self.known_hosts = known_hosts
        self.trust_new_host = trust_new_host
        self.note = note

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust_new_host:
            raise CloudtuneError(
                f"{hostname} is not in {self.known_hosts}: its host key ({key.get_name()} {key.fingerprint}) "
                "cannot be checked, so cloudtune will not connect.",
                "If that fingerprint is the machine's (ask its provider, or run `ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub` on it), run again with --trust-new-host to record it.")
        # Appended rather than rewritten, so the user's comments and other entries stay as they were.
        try:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            existing = self.known_hosts.read_bytes() if self.known_hosts.exists() else b""
            with self.known_hosts.open("a") as handle:
                if existing and not existing.endswith(b"\n"):
                    handle.write("\n")
                handle.write(paramiko.hostkeys.HostKeyEntry([hostname], key).to_line())
        except OSError as exc:
            raise CloudtuneError(f"cannot record {hostname}'s host key in {self.known_hosts} ({exc.strerror}).",
                                 f"Make that file writable, or point {KNOWN_HOSTS_ENV} at one that is.") from None
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.note(f"trusted new host {hostname} ({key.get_name()} {key.fingerprint}); recorded in {self.known_hosts}")


def connect(user: str, host: str, port: int, key: str | None, known_hosts: Path, trust_new_host: bool = False,
            note: Callable[[str], None] = lambda message: None) -> paramiko.SSHClient:
    """An authenticated client, or a CloudtuneError that says what to fix."""
    where = f"{user}@{host}:{port}"
    if key and not Path(key).is_file():
        raise CloudtuneError(f"--key {key}: no such file.", "Give the path of the private key for this machine.")
    client = paramiko.SSHClient()
    if known_hosts.is_file():
        client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(_HostKeyPolicy(known_hosts, trust_new_host, note))
    try:
        client.connect(host, port=port, username=user, key_filename=key, allow_agent=True, look_for_keys=not key,
                       timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT)
    except BaseException as exc:
        client.close()
        if isinstance(exc, CloudtuneError | KeyboardInterrupt):
            raise
        raise _connect_error(exc, where, host, port, key, known_hosts) from None
    client.get_transport().set_keepalive(15)
    return client


def _connect_error(exc: BaseException, where: str, host: str, port: int, key: str | None,
                   known_hosts: Path) -> CloudtuneError:
    if isinstance(exc, paramiko.BadHostKeyException):
        name = host_key_name(host, port)
        return CloudtuneError(
            f"the host key of {name} has CHANGED: it now presents {exc.key.get_name()} {exc.key.fingerprint}, "
            f"but {known_hosts} records {exc.expected_key.get_name()} {exc.expected_key.fingerprint}. Someone may be "
            "intercepting the connection, or the machine was reinstalled; cloudtune never accepts a changed key.",
            f"Only if you know the machine was rebuilt: `ssh-keygen -R '{name}' -f {known_hosts}`, then run again "
            "with --trust-new-host.")
    if isinstance(exc, paramiko.PasswordRequiredException):
        return CloudtuneError(f"the key {key} is protected by a passphrase, which cloudtune does not ask for.",
                              f"Load it into ssh-agent (`ssh-add {key}`) and run without --key.")
    if isinstance(exc, paramiko.AuthenticationException):
        tried = f"the key {key}" if key else "ssh-agent and ~/.ssh/id_* keys"
        return CloudtuneError(f"{where} refused the login with {tried} ({exc}).",
                              "Check the user name, and that the key's public half is in ~/.ssh/authorized_keys "
                              "on the machine; choose the key with --key PATH.")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Unreachable(f"cannot reach {host}:{port}: no answer within {CONNECT_TIMEOUT} s.",
                              "Check the address and port, that the machine is running and that its firewall "
                              "lets SSH in.")
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError) and exc.errors:
        exc = next(iter(exc.errors.values()))  # the socket error behind "unable to connect"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach {host}:{port} ({reason}).",
                              "Check the address and port (user@ip:port), that the machine is running and that "
                              "its firewall lets SSH in.")
    if key and isinstance(exc, (paramiko.SSHException, ValueError)) and "key" in str(exc).lower():
        return CloudtuneError(f"--key {key} is not a private key cloudtune can use ({exc}).",
                              "Give the private half (not the .pub) of an OpenSSH, PEM or PuTTY-converted key.")
    if isinstance(exc, (paramiko.SSHException, ValueError)):
        return CloudtuneError(f"SSH to {where} failed: {exc or type(exc).__name__}.",
                              "`ssh -v` to the same address shows more of what went wrong.")
    return CloudtuneError(f"SSH to {where} failed: {type(exc).__name__}: {exc}.")


class SSHState(MachineState):
    ssh_user: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None
    keep_remote: bool = False
    base_python: str | None = None
    remote_root: str | None = None
    remote_dir: str | None = None
    remote_python: str | None = None
    pid: int | None = None
    container: str | None = None
    docker_image: str | None = None
    docker_user: str | None = None
    docker_gpus: bool = False


def _meta(ctx: RunContext) -> dict:
    # Transitional: the package split gives every field its own accessor.
    return ctx.state.__dict__


class SSHBackend(Backend):
    name = "ssh"
    Options = SSHOptions
    State = SSHState

    def __init__(self, options: SSHOptions | None = None, events: Events | None = None, *,
                 known_hosts: str | Path | None = None, remote_python: str | None = None,
                 remote_root: str | None = None):
        super().__init__(options, events)
        options = self.options
        # All of these go into the state at provision; a backend rebuilt by `logs`/`down` gets them from there.
        self.address = parse_host(options.host) if options.host else None
        self.key = str(Path(options.key).expanduser().resolve()) if options.key else None
        self.trust_new_host = options.trust_new_host
        self.keep_remote = options.keep_remote
        self.known_hosts = known_hosts_path(known_hosts)
        self.remote_python = remote_python or os.environ.get(REMOTE_PYTHON_ENV) or ""
        self.remote_root = remote_root or os.environ.get(REMOTE_ROOT_ENV) or DEFAULT_REMOTE_ROOT
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._redact = Redactor([])
        self._wheel: Path | None = None

    # -- connection ------------------------------------------------------------------------------

    @property
    def _events(self) -> Events:
        return self.events

    @staticmethod
    def _where(ctx: RunContext) -> str:
        return f"{_meta(ctx)['ssh_user']}@{_meta(ctx)['ssh_host']}:{_meta(ctx)['ssh_port']}"

    def _connection(self, ctx: RunContext) -> paramiko.SSHClient:
        if self._active():
            return self._client
        if self._client is not None:
            self._events.warn(f"connection to {_meta(ctx)['ssh_host']} lost; reconnecting")
        self._disconnect()
        if ctx.state.ssh_host is None:
            raise CloudtuneError(f"run {ctx.run_id} has no SSH address in the ledger: it stopped before connecting.")
        meta = _meta(ctx)
        self._client = connect(meta["ssh_user"], meta["ssh_host"], meta["ssh_port"], meta.get("ssh_key"),
                               Path(meta["known_hosts"]), self.trust_new_host, self._events.warn)
        return self._client

    def _active(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return transport is not None and transport.is_active()

    def _files(self, ctx: RunContext) -> paramiko.SFTPClient:
        if self._sftp is None or not self._active():
            self._sftp = self._connection(ctx).open_sftp()
        return self._sftp

    def _disconnect(self) -> None:
        for handle in (self._sftp, self._client):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 - a dead connection may fail to close; it is gone either way
                    pass
        self._sftp = self._client = None

    def _lost(self, exc: BaseException) -> bool:
        """Did this error come from the connection dropping (as opposed to the machine saying no)?"""
        if isinstance(exc, CloudtuneError):
            return isinstance(exc, Unreachable)
        if isinstance(exc, (EOFError, paramiko.SSHException, ConnectionError, socket.timeout)):
            return True
        return isinstance(exc, OSError) and not self._active()

    def _retrying(self, ctx: RunContext, what: str, action: Callable[[], Any]) -> Any:
        """Run action; when the connection drops, reconnect and run it again (it must be resumable)."""
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            try:
                return action()
            except Exception as exc:
                if not self._lost(exc):
                    raise
                self._disconnect()
                if attempt == TRANSFER_ATTEMPTS:
                    raise CloudtuneError(f"lost the connection to {self._where(ctx)} while {what} ({exc or 'EOF'}).",
                                         "Run again: finished work is kept and transfers resume.") from None
                self._events.warn(f"connection to {_meta(ctx)['ssh_host']} lost while {what}; reconnecting")
                time.sleep(attempt)

    def _run(self, ctx: RunContext, script: str, *, check: bool = True,
             on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
        """Run a POSIX sh script on the machine (whatever the login shell is); stdout and stderr together."""
        channel = self._connection(ctx).get_transport().open_session(timeout=CONNECT_TIMEOUT)
        with channel:
            channel.set_combine_stderr(True)
            channel.exec_command("/bin/sh -c " + shlex.quote(script))
            lines = []
            for raw in channel.makefile("rb"):
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            code = channel.recv_exit_status()
        if code == -1:  # the channel closed without an exit status: the connection went away
            raise EOFError("the connection closed before the command finished")
        output = "\n".join(lines)
        if check and code != 0:
            tail = "\n".join(lines[-15:])
            raise CloudtuneError(f"a command failed on {self._where(ctx)} (exit {code}):\n{tail}")
        return code, output

    @staticmethod
    def _marks(output: str) -> list[str]:
        return [line[len(MARK):] for line in output.splitlines() if line.startswith(MARK)]

    def _marked(self, output: str) -> str | None:
        marks = self._marks(output)
        return marks[-1] if marks else None

    # -- the Backend protocol --------------------------------------------------------------------

    def provision(self, ctx: RunContext) -> None:
        if self.address is None:
            raise CloudtuneError("the ssh backend needs a machine: --host user@ip[:port].")
        user, host, port = self.address
        _meta(ctx).update(ssh_user=user, ssh_host=host, ssh_port=port, ssh_key=self.key,
                        known_hosts=str(self.known_hosts), keep_remote=self.keep_remote)
        code = PROBE_CODE.format(mark=MARK, major=MIN_PYTHON[0], minor=MIN_PYTHON[1])
        script = PROBE_SCRIPT.format(python=shlex.quote(self.remote_python), mark=MARK, code=shlex.quote(code),
                                     root=shlex.quote(self.remote_root), run_id=shlex.quote(ctx.run_id))
        _, output = self._run(ctx, script, check=False)
        found = self._marked(output)
        if found is None:
            raise CloudtuneError(f"could not look for Python on {self._where(ctx)}:\n{output[-2000:]}")
        if found == "no-python":
            wanted = f"{self.remote_python} is not there" if self.remote_python else \
                "neither python3 nor python is on the login PATH"
            raise CloudtuneError(f"{host} has no usable Python: {wanted}.",
                                 f"Install Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} there (e.g. `apt-get install -y "
                                 f"python3 python3-venv python3-pip`), or name one with {REMOTE_PYTHON_ENV}=/path.")
        probe = json.loads(found)
        if probe["run"] is None:
            raise CloudtuneError(f"{host}: {probe['python']} is Python {probe['version']}; the training needs "
                                 f">= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}.",
                                 f"Install a newer Python there, or name one with {REMOTE_PYTHON_ENV}=/path.")
        _meta(ctx).update(base_python=probe["python"], remote_root=probe["root"], remote_dir=probe["run"])
        self._events.phase("connected", f"{self._where(ctx)}, Python {probe['version']} ({probe['python']})")
        if ctx.recipe is not None and ctx.recipe.compute.remote_env == "docker":
            self._check_docker(ctx, ctx.recipe.compute.image)

    def bundle_files(self, ctx: RunContext) -> dict[str, Path]:
        self._wheel = build_wheel()
        return {self._wheel.name: self._wheel}

    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        self._redact = Redactor(secrets)
        wheels = [name for name in bundle.files if name.endswith(".whl")]
        if not wheels:
            raise CloudtuneError("the bundle carries no cloudtune wheel for the machine to install.")
        archive = self._upload(ctx, bundle)
        run = _meta(ctx)["remote_dir"]
        if secrets:
            self._write_private(ctx, f"{run}/secrets.env", secrets_env(secrets))
        self._run(ctx, f"tar -xzf {shlex.quote(archive)} -C {shlex.quote(run)}")
        requirements = train_requirements(self._wheel or build_wheel())
        docker = bool(_meta(ctx).get("container"))
        python = self.ensure_image(ctx, requirements) if docker else self.ensure_python(ctx, requirements)
        # cloudtune goes into the run's own directory, not the shared venv, so runs of different
        # cloudtune versions can train side by side on one machine.
        install = (f"{shlex.quote(python)} -m pip install --no-deps --no-index --quiet "
                   f"--disable-pip-version-check --target {shlex.quote(run + '/site')} "
                   f"{shlex.quote(run + '/' + wheels[0])}")
        self._run(ctx, f"docker run --rm {self._docker_args(ctx)} {install}" if docker else install)
        _meta(ctx)["remote_python"] = python

    def start(self, ctx: RunContext, resume: bool = False) -> None:
        run = _meta(ctx)["remote_dir"]
        env = {"CLOUDTUNE_PYTHON": _meta(ctx)["remote_python"], "CLOUDTUNE_HOME": _meta(ctx)["remote_root"],
               "PYTHONPATH": f"{run}/site", "PYTHONUNBUFFERED": "1"}
        if _meta(ctx).get("container"):
            self._start_container(ctx, env, resume)
            return
        assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
        script = (f"cd {shlex.quote(run)} || exit 1\n"
                  f"rm -f {EXIT_FILE}\n"
                  "command -v setsid >/dev/null 2>&1 || { echo 'setsid (util-linux) is missing'; exit 3; }\n"
                  f"{assignments} setsid nohup sh bundle/run.sh{' --resume' if resume else ''} "
                  "</dev/null >/dev/null 2>&1 &\n"
                  "echo $! > pid\n"
                  f"echo {MARK}$!\n")
        _, output = self._run(ctx, script)
        pid = self._marked(output)
        if not pid or not pid.isdigit():
            raise CloudtuneError(f"could not start the training on {self._where(ctx)}:\n{output[-2000:]}")
        # Not being a group leader, the shell's child made its own session: its pid is the group id.
        _meta(ctx)["pid"] = int(pid)

    def exit_code(self, ctx: RunContext) -> int | None:
        for _ in range(10):
            try:
                text = self._read(ctx, f"{_meta(ctx)['remote_dir']}/{EXIT_FILE}").strip()
            except FileNotFoundError:
                return None
            if text:
                return int(text) if text.lstrip("-").isdigit() else None
            time.sleep(0.1)  # caught between the shell creating the file and writing the status
        return None

    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        if ctx.state.remote_dir is None:
            return
        path = f"{_meta(ctx)['remote_dir']}/{LOG_FILE}"
        offset, pending, lost_since, checked_process = 0, b"", None, 0.0
        while True:
            try:
                check_process = follow and time.time() - checked_process > LIVENESS_SECONDS
                finished = self._finished(ctx, check_process)
                checked_process = time.time() if check_process else checked_process
                chunk = self._read_from(ctx, path, offset)
                lost_since = None
            except FileNotFoundError:
                yield from self._saved_log(ctx)  # the run's directory is gone: show the copy taken at teardown
                return
            except Exception as exc:
                if not self._lost(exc):
                    raise
                self._disconnect()
                lost_since = lost_since or time.time()
                if time.time() - lost_since > RECONNECT_SECONDS:
                    raise CloudtuneError(
                        f"lost the connection to {self._where(ctx)} and could not get it back within "
                        f"{RECONNECT_SECONDS} s ({exc or 'EOF'}).",
                        f"Once the machine answers again, `cloudtune logs {ctx.run_id} -f` reattaches to the "
                        f"training and `cloudtune down {ctx.run_id}` stops it and cleans up.") from None
                self._events.warn(f"connection to {_meta(ctx)['ssh_host']} lost ({exc or 'EOF'}); "
                                  "reconnecting to resume the log")
                time.sleep(min(5.0, 1 + (time.time() - lost_since) / 4))
                continue
            if chunk:
                # Split on bytes, so a UTF-8 character cut between two reads is decoded whole.
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
                continue
            if finished or not follow:
                if pending:
                    yield pending.decode(errors="replace")
                return
            time.sleep(POLL_SECONDS)

    def pull(self, ctx: RunContext, staging: Path) -> None:
        out = f"{_meta(ctx)['remote_dir']}/out"
        files = self._retrying(ctx, "listing the outputs", lambda: self._walk(ctx, out, top=True))
        total = sum(size for _, size in files)
        done = 0
        for remote, size in files:
            local = staging / remote[len(out) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            base = done

            def fetch(remote=remote, local=local, base=base):
                self._files(ctx).get(remote, str(local),
                                     callback=lambda got, _size: self._events.progress("download", base + got, total))

            self._retrying(ctx, f"downloading {remote}", fetch)
            done += size
        try:
            manifest.verify(staging, manifest.read_manifest(staging / manifest.MANIFEST))
        except CloudtuneError as exc:
            _meta(ctx)["keep_remote"] = True  # the machine holds the only copy now: teardown must not delete it
            raise CloudtuneError(exc.message, f"Nothing was moved into your output directory. The outputs stay on "
                                              f"{self._where(ctx)} in {out} for you to inspect.") from None

    def stop(self, ctx: RunContext) -> None:
        if not self._started(ctx) or ctx.state.ssh_host is None:
            return
        try:
            self._stop_group(ctx)
        except Exception as exc:  # noqa: BLE001 - stopping is best effort; teardown verifies and reports
            if not isinstance(exc, CloudtuneError) and not self._lost(exc):
                raise
            self._events.warn(f"could not stop the training on {_meta(ctx)['ssh_host']}: {exc}")

    def teardown(self, ctx: RunContext) -> bool:
        run = _meta(ctx).get("remote_dir")
        if not run:
            return True  # provisioning never got as far as creating anything on the machine
        try:
            self._save_log(ctx)
            # One round trip: stop what still runs, remove the run's files, report both.
            script = self._stop_script(ctx, STOP_GRACE_SECONDS) + "\n" if self._started(ctx) else ""
            doomed = run + "/secrets.env" if _meta(ctx).get("keep_remote") else run
            bundles = shlex.quote(_meta(ctx)["remote_root"] + "/bundles")
            script += (f"rm -rf -- {shlex.quote(doomed)}\n"
                       f"[ -e {shlex.quote(doomed)} ] && echo {MARK}left || echo {MARK}removed\n"
                       f"(cd {bundles} 2>/dev/null && ls -1t -- *.tar.gz 2>/dev/null | tail -n +{KEEP_BUNDLES + 1} "
                       f"| xargs -r rm -f -- ; find . -maxdepth 1 -name '*.part' -mmin +1440 -delete) || true\n")
            _, output = self._run(ctx, script, check=False)
            marks = self._marks(output)
            return marks[-1:] == ["removed"] and "alive" not in marks
        except Exception as exc:  # noqa: BLE001 - reported as "not verified", and `cloudtune down` can retry
            if not isinstance(exc, CloudtuneError) and not self._lost(exc):
                raise
            self._events.warn(f"could not clean up on {_meta(ctx).get('ssh_host')}: {exc}")
            return False
        finally:
            self._disconnect()

    # -- pieces ----------------------------------------------------------------------------------

    def _upload(self, ctx: RunContext, bundle: Bundle) -> str:
        """Put the bundle on the machine once per sha256; an interrupted upload resumes where it stopped."""
        target = f"{_meta(ctx)['remote_root']}/bundles/{bundle.sha256}.tar.gz"
        if self._remote_sha256(ctx, target) == bundle.sha256:
            self._events.phase("upload", "skipped: the machine already has this bundle (sha256 matches)")
            return target
        partial = target + ".part"
        for fresh in (False, True):
            if fresh:  # the resumed file did not check out: start over once
                self._events.warn("the uploaded bundle did not match its sha256; uploading it again from the start")
                self._files(ctx).remove(partial)
            self._retrying(ctx, "uploading the bundle", lambda: self._send(ctx, bundle.path, partial))
            digest = self._remote_sha256(ctx, partial)
            if digest == bundle.sha256:
                self._files(ctx).posix_rename(partial, target)
                return target
        self._files(ctx).remove(partial)
        raise CloudtuneError(f"the bundle uploaded to {self._where(ctx)} has sha256 {digest}, "
                             f"not {bundle.sha256}, even after a fresh upload.",
                             "Check the machine's disk (full? failing?) and run again.")

    def _send(self, ctx: RunContext, local: Path, remote: str) -> None:
        sftp = self._files(ctx)
        size = local.stat().st_size
        try:
            offset = sftp.stat(remote).st_size
        except FileNotFoundError:
            offset = 0
        if offset > size:
            offset = 0
        if offset:
            self._events.phase("upload", f"resuming at {offset:,} of {size:,} bytes")
        with local.open("rb") as source, sftp.open(remote, "r+b" if offset else "wb") as sink:
            sink.set_pipelined(True)
            source.seek(offset)
            sink.seek(offset)
            done = offset
            self._events.progress("upload", done, size)
            while chunk := source.read(UPLOAD_CHUNK):
                sink.write(chunk)
                done += len(chunk)
                self._events.progress("upload", done, size)

    def _remote_sha256(self, ctx: RunContext, path: str) -> str | None:
        quoted = shlex.quote(path)
        _, output = self._run(ctx, f"[ -f {quoted} ] && {{ sha256sum {quoted} 2>/dev/null || "
                                   f"shasum -a 256 {quoted}; }} | sed 's/^/{MARK}/'", check=False)
        found = self._marked(output)
        return found.split()[0] if found else None

    def _write_private(self, ctx: RunContext, path: str, text: str) -> None:
        with self._files(ctx).open(path, "w") as handle:
            handle.chmod(0o600)  # before a single byte of the secret is written
            handle.write(text)

    def ensure_python(self, ctx: RunContext, requirements: list[str]) -> str:
        """The machine's Python when it has the requirements already; otherwise a venv built once per set."""
        base = _meta(ctx)["base_python"]
        _, output = self._run(ctx, f"{shlex.quote(base)} -c {shlex.quote(MISSING_CODE)} {shlex.quote(MARK)} "
                                   f"{shlex.quote(json.dumps(requirements))}")
        missing = json.loads(self._marked(output) or "null")
        if missing is None:
            raise CloudtuneError(f"could not check the Python packages on {self._where(ctx)}:\n{output[-2000:]}")
        if not missing:
            self._events.phase("env", f"{base} already has the training packages")
            return base
        key = hashlib.sha256(json.dumps([base, sorted(requirements)]).encode()).hexdigest()[:16]
        venv = f"{_meta(ctx)['remote_root']}/envs/{key}"
        self._events.phase("env", f"{venv}: a venv for {', '.join(missing)} (built once, reused by later runs)")
        _, output = self._run(ctx, f"{shlex.quote(base)} -c {shlex.quote(VENV_CODE)} {shlex.quote(MARK)} "
                                   f"{shlex.quote(venv)} {shlex.quote(json.dumps(requirements))}",
                              on_line=self._events.log)
        return self._marked(output) or f"{venv}/bin/python"

    def _read(self, ctx: RunContext, path: str) -> str:
        with self._files(ctx).open(path, "r") as handle:
            return handle.read().decode(errors="replace")

    def _read_from(self, ctx: RunContext, path: str, offset: int) -> bytes:
        """Bytes of a remote file from offset on (at most 1 MiB); nothing if it does not exist yet."""
        try:
            with self._files(ctx).open(path, "r") as handle:
                handle.seek(offset)
                return handle.read(1 << 20)
        except FileNotFoundError:
            self._files(ctx).stat(_meta(ctx)["remote_dir"])  # raises FileNotFoundError when the run dir is gone
            return b""

    def _finished(self, ctx: RunContext, check_process: bool) -> bool:
        try:
            self._files(ctx).stat(f"{_meta(ctx)['remote_dir']}/{EXIT_FILE}")
            return True
        except FileNotFoundError:
            pass
        if not check_process:
            return False
        return not self._started(ctx) or not self._alive(ctx)

    @staticmethod
    def _started(ctx: RunContext) -> bool:
        """Whether there may be a training to look at or stop: a process group, or a container."""
        return bool(_meta(ctx).get("pid") or _meta(ctx).get("container"))

    def _stop_script(self, ctx: RunContext, grace: float | str) -> str:
        """Prints MARK alive/gone. With a grace, first TERMs the training (process group or container)
        and KILLs what remains once it has passed; with "check", only looks."""
        if not _meta(ctx).get("container"):
            return (f"{shlex.quote(_meta(ctx)['base_python'])} -c {shlex.quote(GROUP_CODE)} {shlex.quote(MARK)} "
                    f"{int(_meta(ctx)['pid'])} {grace}")
        name = shlex.quote(_meta(ctx)["container"])
        # docker stop TERMs the container's init, which passes it to the whole training process group
        stopping = "" if grace == "check" else (f"docker stop -t {int(grace)} {name} >/dev/null 2>&1; "
                                                f"docker rm -f {name} >/dev/null 2>&1\n")
        return (f"{stopping}if [ \"$(docker inspect --format '{{{{.State.Running}}}}' {name} 2>/dev/null)\" = true ]; "
                f"then echo {MARK}alive; else echo {MARK}gone; fi")

    def _alive(self, ctx: RunContext) -> bool:
        _, output = self._run(ctx, self._stop_script(ctx, "check"))
        return self._marked(output) == "alive"

    def _stop_group(self, ctx: RunContext) -> bool:
        """TERM the training, KILL what remains after a grace period; True once it is gone."""
        _, output = self._run(ctx, self._stop_script(ctx, STOP_GRACE_SECONDS))
        return self._marked(output) == "gone"

    # -- Docker (compute.remote_env: docker) -------------------------------------------------------

    def _check_docker(self, ctx: RunContext, image: str) -> None:
        script = ("if out=$(docker version --format '{{.Server.Version}}' 2>&1); then "
                  f"echo \"{MARK}docker $out\"; else echo \"$out\"; fi\n"
                  f"echo \"{MARK}user $(id -u):$(id -g)\"\n"
                  f"command -v nvidia-smi >/dev/null 2>&1 && echo {MARK}gpus\n")
        _, output = self._run(ctx, script, check=False)
        marks = dict(mark.partition(" ")[::2] for mark in self._marks(output))
        if "docker" not in marks:
            said = "\n".join(line for line in output.splitlines() if not line.startswith(MARK))[-1500:]
            raise CloudtuneError(f"{_meta(ctx)['ssh_host']}: compute.remote_env is docker, but Docker does not answer "
                                 f"there for {_meta(ctx)['ssh_user']}:\n{said}",
                                 "Install Docker there (and the NVIDIA container toolkit for GPUs) and let the SSH "
                                 "user run it (the docker group), or set compute.remote_env: python.")
        _meta(ctx).update(docker_image=image, docker_user=marks.get("user", "0:0"), docker_gpus="gpus" in marks,
                        container=f"{CONTAINER_PREFIX}{ctx.run_id}")
        self._events.phase("connected", f"Docker {marks['docker']}; training in {image}"
                                        f"{' with the GPUs' if 'gpus' in marks else ''}")

    def _docker_args(self, ctx: RunContext, env: dict[str, str] | None = None) -> str:
        """`docker run` options and image: the login user's ids, the remote root at its own path."""
        meta = _meta(ctx)
        root = meta["remote_root"]
        env = {"HOME": f"{root}/home", "USER": meta["ssh_user"], **(env or {})}
        options = ["--user", meta["docker_user"], "--network", "host", "--ipc", "host", "-v", f"{root}:{root}",
                   "-w", meta["remote_dir"]] + (["--gpus", "all"] if meta.get("docker_gpus") else [])
        for name, value in env.items():  # never a secret: those reach the training through secrets.env
            options += ["-e", f"{name}={value}"]
        return " ".join(shlex.quote(option) for option in options + [meta["docker_image"]])

    def ensure_image(self, ctx: RunContext, requirements: list[str]) -> str:
        """Pull the image once; returns the Python to train with in it: its own, or a venv over it for
        what it lacks, built once per (image, requirements) under the remote root."""
        image, root = _meta(ctx)["docker_image"], _meta(ctx)["remote_root"]
        self._run(ctx, f"mkdir -p {shlex.quote(root + '/home')}")
        quoted = shlex.quote(image)
        code, output = self._run(ctx, f"docker image inspect {quoted} >/dev/null 2>&1 || docker pull {quoted}",
                                 check=False, on_line=self._events.log)
        if code != 0:
            raise CloudtuneError(f"could not get the image {image} on {self._where(ctx)}:\n{output[-1500:]}",
                                 "Check compute.image (a pinned tag or digest) and that the machine can reach its "
                                 "registry (`docker login` there for a private one).")
        run = f"docker run --rm {self._docker_args(ctx)} python3 -c"
        code, output = self._run(ctx, f"{run} {shlex.quote(MISSING_CODE)} {shlex.quote(MARK)} "
                                      f"{shlex.quote(json.dumps(requirements))}", check=False)
        missing = json.loads(self._marked(output) or "null")
        if missing is None:
            raise CloudtuneError(f"the image {image} could not run python3 on {self._where(ctx)}:\n{output[-1500:]}",
                                 f"The image needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} as python3 on its PATH; "
                                 "the repository's Dockerfile builds one with every training package.")
        if not missing:
            self._events.phase("env", f"{image} already has the training packages")
            return "python3"
        key = hashlib.sha256(json.dumps([image, sorted(requirements)]).encode()).hexdigest()[:16]
        venv = f"{root}/envs/docker-{key}"
        self._events.phase("env", f"{venv}: a venv over {image} for {', '.join(missing)} (built once, reused)")
        _, output = self._run(ctx, f"{run} {shlex.quote(VENV_CODE)} {shlex.quote(MARK)} {shlex.quote(venv)} "
                                   f"{shlex.quote(json.dumps(requirements))}", on_line=self._events.log)
        return self._marked(output) or f"{venv}/bin/python"

    def _start_container(self, ctx: RunContext, env: dict[str, str], resume: bool) -> None:
        name = shlex.quote(_meta(ctx)["container"])
        # --init puts tini first; told to, it passes `docker stop`'s TERM to the whole process group,
        # so the trainer checkpoints as it does outside a container.
        options = self._docker_args(ctx, {**env, "TINI_KILL_PROCESS_GROUP": "1"})
        script = (f"cd {shlex.quote(_meta(ctx)['remote_dir'])} || exit 1\n"
                  f"rm -f {EXIT_FILE}\n"
                  f"docker rm -f {name} >/dev/null 2>&1\n"
                  f"id=$(docker run -d --rm --init --name {name} {options} sh bundle/run.sh"
                  f"{' --resume' if resume else ''}) && echo {MARK}$id\n")
        _, output = self._run(ctx, script, check=False)
        if not self._marked(output):
            hint = ("The machine's Docker cannot reach its GPUs: install the NVIDIA container toolkit there."
                    if "gpu" in output.lower() else None)
            raise CloudtuneError(f"could not start the training container on {self._where(ctx)}:\n{output[-1500:]}",
                                 hint)

    def _walk(self, ctx: RunContext, folder: str, top: bool = False) -> list[tuple[str, int]]:
        found = []
        for entry in self._files(ctx).listdir_attr(folder):
            if top and entry.filename in manifest.NOT_PULLED:
                continue
            path = f"{folder}/{entry.filename}"
            if stat.S_ISDIR(entry.st_mode):
                found += self._walk(ctx, path)
            elif stat.S_ISREG(entry.st_mode):
                found.append((path, entry.st_size))
        return found

    def _save_log(self, ctx: RunContext) -> None:
        """Keep a (redacted) copy of the training log here, for `cloudtune logs` once the machine forgets it."""
        try:
            text = self._read(ctx, f"{_meta(ctx)['remote_dir']}/{LOG_FILE}")
        except FileNotFoundError:
            return
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        (ctx.work_dir / LOG_FILE).write_text(self._redact(text))

    @staticmethod
    def _saved_log(ctx: RunContext) -> Iterator[str]:
        copy = ctx.work_dir / LOG_FILE
        if copy.is_file():
            yield from copy.read_text(errors="replace").splitlines()
