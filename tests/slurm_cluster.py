"""A one-node Slurm on 127.0.0.1 with an sshd "login node", for the REAL SkyPilot client to launch on
through its Slurm cloud (tests/test_skypilot_slurm.py).

Debian's munge, slurmctld and slurmd run in the foreground as children of the test session, each with
its config, state, socket and log under the session's own scratch folder, on free ports; everything is
stopped by the PID recorded when it was started. Jobs run as one dedicated user, NODE_USER, whose home is
moved into the scratch folder for the session (its uid, and so SkyPilot's uv cache under /tmp, stays
the same across sessions, which keeps the second session fast).

Offline, SkyPilot's runtime set-up on the node needs three stand-ins (found by hand; see
../shared/skypilot-slurm/README.md for the story):
- its `curl -LsSf https://astral.sh/uv/install.sh | sh` gets a `curl` on the user's PATH that answers that
  one URL with an "installer" linking the uv of PyPI's `uv` wheel;
- its `uv venv --python 3.10` finds a python3.10 of this machine, copied where the user can read it and
  made relocatable (its libpython is found beside it);
- uv is pointed at the system CA bundle, as the package index is reached through a TLS proxy.
The node advertises two GPUs (GRES gpu:t4 on /dev/null and /dev/zero): there are none here, but they let
SkyPilot and cloudtune take the path a real GPU cluster takes (the training falls back to the CPU).
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .processes import stop_process

NODE_USER = "cloudtune-slurm"
SLURM_NAME = "ctslurm"  # Slurm's ClusterName and the Host in ~/.slurm/config: SkyPilot's region
PACKAGES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "squeue", "scancel", "patchelf", "rsync")
NODE_CPUS = 8  # advertised (SlurmdParameters=config_overrides): more than the machine has, so jobs fit
NODE_MEMORY_MB = 64000  # SkyPilot's default resources for a GPU task ask for 16 GB
# Advertised GPUs (GRES on character devices that exist everywhere): two, so that a task asking for T4:2
# takes the path of a multi-GPU node, torchrun from SkyPilot's node variables (the ranks train on the CPU)
NODE_GPU_FILES = ("/dev/null", "/dev/zero")
LOCK = Path("/tmp/cloudtune-slurm-tests.lock")  # one session at a time owns NODE_USER
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing_packages() -> list[str]:
    return [name for name in PACKAGES if not (shutil.which(name) or Path("/usr/sbin", name).exists())]


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


@dataclass
class SlurmCluster:
    scratch: Path
    ssh_port: int = field(default_factory=free_port)
    ctld_port: int = field(default_factory=free_port)
    slurmd_port: int = field(default_factory=free_port)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_python: str = ""  # the Python the node user trains with (torch, transformers, peft, trl, ...)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per start-up step, for the report
    _lock: object = None

    @property
    def conf(self) -> Path:
        return self.scratch / "etc" / "slurm.conf"

    @property
    def node_home(self) -> Path:
        return self.scratch / "node-home"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # start ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._lock = LOCK.open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # a concurrent session waits here for the node user
        for folder in ("etc", "state", "spool", "logs", "run", "shims", "runtime"):
            (self.scratch / folder).mkdir(parents=True, exist_ok=True)
        for step in (self._node_user, self._munge, self._slurm, self._offline_runtime, self._trainer_python,
                     self._sshd):
            started = time.time()
            step()
            self.timings[step.__name__.strip("_")] = round(time.time() - started, 1)

    def _daemon(self, name: str, *args: str) -> None:
        log = (self.scratch / "logs" / f"{name}.out").open("w")
        self.daemons[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True)

    def _wait(self, what: str, ready, seconds: float = 30) -> None:
        deadline = time.time() + seconds
        while not ready():
            dead = [name for name, process in self.daemons.items() if process.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (self.scratch / "logs").glob("*"))
                raise RuntimeError(f"{what} did not come up (exited: {dead}):\n{logs}")
            time.sleep(0.2)

    def _node_user(self) -> None:
        if subprocess.run(["id", NODE_USER], capture_output=True).returncode != 0:
            _run("useradd", "--create-home", "--home-dir", str(self.node_home), "--shell", "/bin/bash", NODE_USER)
        else:
            self.node_home.mkdir(exist_ok=True)
            _run("usermod", "--home", str(self.node_home), NODE_USER)
        _run("usermod", "-p", "*", NODE_USER)  # unlocked for key logins, no password
        shutil.chown(self.node_home, NODE_USER, NODE_USER)
        self.scratch.chmod(0o755)
        shutil.chown(self.scratch / "runtime", NODE_USER, NODE_USER)
        (self.node_home / ".profile").write_text(
            "# SkyPilot's SSH runner uses login shells, and Debian's /etc/profile resets PATH.\n"
            f"export PATH={self.scratch}/shims:/usr/local/bin:/usr/bin:/bin\n"
            f"export SLURM_CONF={self.conf}\n"
            "# the package index is reached through a TLS proxy whose CA is only in the system bundle\n"
            f"export SSL_CERT_FILE={CA_BUNDLE} REQUESTS_CA_BUNDLE={CA_BUNDLE} PIP_CERT={CA_BUNDLE}\n")
        shutil.chown(self.node_home / ".profile", NODE_USER, NODE_USER)
        # As Debian's and Ubuntu's default (/etc/skel), so every machine runs the tests against the same one:
        # a shell that is not interactive returns before the line SkyPilot appends, the one that moves HOME
        # into the cluster's folder; a command over SSH (rsync's) starts in the login home.
        (self.node_home / ".bashrc").write_text("case $- in\n    *i*) ;;\n      *) return;;\nesac\n")
        shutil.chown(self.node_home / ".bashrc", NODE_USER, NODE_USER)

    def _munge(self) -> None:
        folder = self.scratch / "munge"
        folder.mkdir(mode=0o700, exist_ok=True)
        _run("mungekey", "-c", "-k", str(folder / "munge.key"), "-b", "1024")
        self._daemon("munged", "munged", "--foreground", f"--key-file={folder}/munge.key",
                     f"--socket={self.scratch}/run/munge.socket", f"--pid-file={self.scratch}/run/munged.pid",
                     f"--log-file={self.scratch}/logs/munged.log", f"--seed-file={folder}/munged.seed")
        self._wait("munged", (self.scratch / "run" / "munge.socket").exists)

    def _slurm(self) -> None:
        node = socket.gethostname().split(".")[0]
        s = self.scratch
        (s / "etc" / "gres.conf").write_text("".join(f"NodeName={node} Name=gpu Type=t4 File={device}\n"
                                                     for device in NODE_GPU_FILES))
        (s / "etc" / "plugstack.conf").write_text("")
        self.conf.write_text(f"""\
ClusterName={SLURM_NAME}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={s}/run/munge.socket
CredType=cred/munge
PlugStackConfig={s}/etc/plugstack.conf
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool/slurmd-%n
SlurmctldPidFile={s}/run/slurmctld.pid
SlurmdPidFile={s}/run/slurmd.pid
SlurmctldLogFile={s}/logs/slurmctld.log
SlurmdLogFile={s}/logs/slurmd.log
MpiDefault=none
SwitchType=switch/none
# linuxproc and no task plugin: nothing touches the host's cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# without a default, a job with no --mem asks for the whole node and queues behind SkyPilot's allocation
DefMemPerCPU=512
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=30
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket={NODE_CPUS} \
ThreadsPerCore=1 RealMemory={NODE_MEMORY_MB} Gres=gpu:t4:{len(NODE_GPU_FILES)} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon("slurmctld", "slurmctld", "-D", "-i")
        self._daemon("slurmd", "slurmd", "-D", "-N", node)
        self._wait("slurm", lambda: self.sinfo().split(" ")[0] in ("idle", "mix", "alloc"), seconds=60)

    def sinfo(self) -> str:
        done = subprocess.run(["sinfo", "-h", "-o", "%t %G"], capture_output=True, text=True, env=self.env)
        return done.stdout.strip()

    def _offline_runtime(self) -> None:
        """uv and python3.10 where the node user finds them, and the curl stand-in (see the module's doc)."""
        uv = self.scratch / "uv"
        _run(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(uv),
             "uv")
        python310 = self._runnable(find_python("3.10"), "python3.10")
        (self.scratch / "shims" / "python3.10").symlink_to(python310)
        curl = self.scratch / "shims" / "curl"
        curl.write_text(f"""#!/bin/sh
# SkyPilot installs uv with `curl -LsSf https://astral.sh/uv/install.sh | sh`: answer that one URL with an
# installer that links the uv of PyPI's wheel; anything else goes to the real curl.
for arg in "$@"; do
  if [ "$arg" = https://astral.sh/uv/install.sh ]; then
    printf '%s\\n' 'd="${{UV_INSTALL_DIR:-$HOME/.local/bin}}"; mkdir -p "$d"' \\
      'ln -sf {uv}/bin/uv "$d/uv"; ln -sf {uv}/bin/uvx "$d/uvx"'
    exit 0
  fi
done
exec /usr/bin/curl "$@"
""")
        curl.chmod(0o755)
        self.as_node_user(f"{python310} -c 'import ssl, sqlite3, ctypes' && {uv}/bin/uv --version")

    def _runnable(self, python: Path, name: str) -> Path:
        """The real interpreter of `python` if the node user can run it, else a copy of its installation:
        hard links where the files allow, the interpreter itself copied and pointed at its own libpython."""
        executable, prefix = interpreter(python)
        if self.node_user_can_run(executable):
            return executable
        target = self.scratch / name
        if subprocess.run(["cp", "-al", str(prefix), str(target)], capture_output=True).returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(prefix, target, symlinks=True)
        binary = target / executable.relative_to(prefix)
        binary.unlink()
        shutil.copy2(executable, binary)
        _run("patchelf", "--set-rpath", "$ORIGIN/../lib", str(binary))
        return binary

    def _trainer_python(self) -> None:
        """A venv the node user can run with the packages of the Python running these tests.

        Its base is a Python the user can already run, else a readable copy; the packages are the test
        venv's own, through a .pth file where the user can read them, else hard-linked copies."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        debian = Path(f"/usr/bin/python{version}")
        base = debian if debian.exists() and self.node_user_can_run(debian) else \
            self._runnable(Path(sys.executable), f"python{version}")
        venv = self.scratch / "trainer-venv"
        _run(str(base), "-m", "venv", "--without-pip", str(venv))
        site = Path(sysconfig.get_paths()["purelib"])
        if subprocess.run(["runuser", "-u", NODE_USER, "--", "test", "-r", str(site / "torch" / "__init__.py")],
                          cwd="/").returncode != 0:
            copied = self.scratch / "trainer-site-packages"
            _run("cp", "-al", str(site), str(copied))
            site = copied
        venv_site = next(venv.glob("lib/python*/site-packages"))
        (venv_site / "test-packages.pth").write_text(f"{site}\n")
        python = venv / "bin" / "python"
        self.as_node_user(f"{python} -c 'import pip, yaml'")  # the light ones; the training imports the rest
        self.node_python = str(python)

    def node_user_can_run(self, python: Path, code: str = "pass") -> bool:
        return subprocess.run(["runuser", "-u", NODE_USER, "--", str(python), "-c", code],
                              capture_output=True, cwd="/").returncode == 0

    def as_node_user(self, command: str) -> str:
        done = subprocess.run(["runuser", "-l", NODE_USER, "-c", command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"as {NODE_USER}: {command}\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _sshd(self) -> None:
        folder = self.scratch / "ssh"
        folder.mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key"))
        (folder / "sshd_config").write_text(f"""\
Port {self.ssh_port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers {NODE_USER}
SetEnv SLURM_CONF={self.conf}
Subsystem sftp internal-sftp
MaxSessions 200
MaxStartups 200:30:400
LogLevel ERROR
""")
        Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd insists on its privilege-separation directory
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self._daemon("sshd", sshd, "-D", "-e", "-f", str(folder / "sshd_config"))
        self._wait("sshd", lambda: _answers_ssh(self.ssh_port))

    # a client ------------------------------------------------------------------------------------

    def client_home(self, home: Path) -> None:
        """A HOME for SkyPilot's client pointing at this Slurm: ~/.slurm/config, ~/.sky/config.yaml, a key."""
        (home / ".ssh").mkdir(parents=True, mode=0o700, exist_ok=True)
        key = home / ".ssh" / "slurm_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudtune-slurm-test", "-f", str(key))
        ssh_dir = self.node_home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        with authorized.open("a") as handle:
            handle.write(key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        for path in (ssh_dir, authorized):
            shutil.chown(path, NODE_USER, NODE_USER)
        (home / ".slurm").mkdir(exist_ok=True)
        (home / ".slurm" / "config").write_text(
            f"Host {SLURM_NAME}\n    HostName 127.0.0.1\n    Port {self.ssh_port}\n    User {NODE_USER}\n"
            f"    IdentityFile {key}\n    IdentitiesOnly yes\n")
        (home / ".sky").mkdir(exist_ok=True)
        # The node-local runtime folder SkyPilot uses (default /tmp/<cluster>), inside the scratch folder.
        (home / ".sky" / "config.yaml").write_text(
            f"slurm:\n  cluster_configs:\n    {SLURM_NAME}:\n      tmpdir: {self.scratch}/runtime\n")

    # what is left --------------------------------------------------------------------------------

    def jobs(self) -> list[str]:
        """The node user's Slurm jobs: 'id state name' lines. A loaded slurmctld can time squeue out, which
        prints nothing: asked again rather than taken for "no job"."""
        for _attempt in range(10):
            done = subprocess.run(["squeue", "-h", "-u", NODE_USER, "-o", "%i %T %j"], capture_output=True,
                                  text=True, env=self.env)
            if done.returncode == 0:
                return done.stdout.split("\n") if done.stdout.strip() else []
            time.sleep(1)
        raise AssertionError(f"squeue kept failing: {done.stderr.strip()}")

    def node_user_pids(self) -> list[int]:
        done = subprocess.run(["ps", "-o", "pid=", "-u", NODE_USER], capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    def stop(self) -> None:
        """The node user's jobs and processes, then the daemons, each by the PID recorded for it."""
        if "slurmctld" in self.daemons:
            subprocess.run(["scancel", "-u", NODE_USER], capture_output=True, env=self.env)
        for pid in self.node_user_pids():
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        for name in ("sshd", "slurmd", "slurmctld", "munged"):
            process = self.daemons.get(name)
            if process is None:
                continue
            stop_process(process, grace_seconds=15)
        if self._lock is not None:
            self._lock.close()


@dataclass
class SkyHome:
    """A HOME for SkyPilot's client and a CLOUDTUNE_HOME's worth of environment, for CLI subprocesses that
    use the real SkyPilot: its own local API server on its own port, never the real ~/.sky."""

    cluster: SlurmCluster
    home: Path
    port: int = field(default_factory=free_port)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("SKY_RUNTIME_DIR", "SKYPILOT_DISABLE_LOCAL_API_SERVER")}
        return {**env, "HOME": str(self.home), "SKYPILOT_API_SERVER_LOCAL_PORT": str(self.port),
                "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "SLURM_CONF": str(self.cluster.conf),
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}", **extra}

    def sky(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        sky = Path(sys.executable).parent / "sky"
        return subprocess.run([str(sky), *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.home)

    def start(self) -> None:
        self.cluster.client_home(self.home)
        # SkyPilot names GPUs through its common accelerator list, which it would download: this HOME gets
        # the copy in cloudtune's bundled catalog snapshot instead.
        common = self.home / ".sky" / "catalogs" / "v8" / "common"
        common.mkdir(parents=True)
        for csv in (Path(__file__).parents[1] / "cloudtune" / "data" / "catalog" / "v8" / "common").glob("*.csv"):
            shutil.copy(csv, common / csv.name)
        # A fresh API server checks clouds in the background and enabled_clouds reads only cached results.
        started = time.time()
        done = self.sky("check", "slurm")
        self.cluster.timings["sky check"] = round(time.time() - started, 1)
        if "enabled" not in done.stdout or SLURM_NAME not in done.stdout:
            raise RuntimeError(f"sky check slurm did not enable {SLURM_NAME}:\n{done.stdout}\n{done.stderr}")

    def clusters(self) -> dict[str, str]:
        """name -> status of this HOME's SkyPilot clusters, refreshed from Slurm: what `sky status --refresh`
        lists, without the CLI's own start and its questions to the jobs and serve controllers (seconds)."""
        return {name: record["status"] for name, record in self._status().items()}

    def record(self, name: str) -> dict:
        """SkyPilot's own record of a cluster (status refreshed from Slurm, as `sky status --refresh` has it;
        autostop minutes, to_down)."""
        return self._status(name)[name]

    def _status(self, name: str | None = None) -> dict[str, dict]:
        """sky.status refreshed from Slurm (StatusRefreshMode.FORCE), of one cluster or all of them, through
        SkyPilot's SDK in a subprocess under this HOME (this process must not import sky under another HOME)."""
        code = ("import json, sys, sky; from sky.utils import common; "
                "names = sys.argv[1:] or None; "
                "records = sky.get(sky.status(names, refresh=common.StatusRefreshMode.FORCE)); "
                "print(json.dumps({r['name']: {'status': r['status'].value, 'autostop': r['autostop'], "
                "'to_down': r['to_down']} for r in records}))")
        done = subprocess.run([sys.executable, "-c", code, *([name] if name else [])], env=self.env(),
                              capture_output=True, text=True, timeout=300, cwd=self.home)
        if done.returncode != 0:
            raise RuntimeError(f"sky.status({name or ''}) failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    @contextlib.contextmanager
    def request_canceller(self, name: str) -> Iterator[Callable[[], list[str]]]:
        """A call that cancels the running requests called `name` (`sky.logs`: a CLI's log stream) on this
        HOME's API server, which keeps running, as `sky api cancel ID` does, and returns their ids. Through
        the SDK in a subprocess (as `_status`) started now, so that its `import sky` (3 s) is done by the
        time the test calls it."""
        code = ("import json, sys, sky; sys.stdin.readline(); "
                "ids = [r.request_id for r in sky.api_status() if r.name == sys.argv[1] and r.status == 'RUNNING']; "
                "ids and sky.get(sky.api_cancel(ids, silent=True)); print(json.dumps(ids))")
        process = subprocess.Popen([sys.executable, "-c", code, name], env=self.env(), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.home)

        def cancel() -> list[str]:
            out, err = process.communicate("\n", timeout=120)
            if process.returncode != 0:
                raise RuntimeError(f"cancelling the {name} requests failed:\n{err[-3000:]}")
            return json.loads(out.strip().splitlines()[-1])

        try:
            yield cancel
        finally:
            if process.poll() is None:
                stop_process(process, 5)

    def stop(self) -> None:
        """Every cluster of this HOME down, and its API server stopped (`sky api stop` stops the one on
        this HOME's port, by the PID SkyPilot recorded for it)."""
        if (self.home / ".sky").exists():
            self.sky("down", "--all", "--yes", timeout=600)
            self.sky("api", "stop", timeout=120)


def _answers_ssh(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            return conn.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


def interpreter(python: Path) -> tuple[Path, Path]:
    """(the real interpreter, its installation's prefix) behind `python`, which may be a venv's or a shim."""
    done = _run(str(python), "-c", "import os, sys; print(os.path.realpath(sys.executable)); print(sys.base_prefix)")
    executable, prefix = done.stdout.split("\n")[:2]
    return Path(executable), Path(prefix)  # a venv's python is a link to its base's, realpath follows it


def find_python(version: str) -> Path:
    """A python{version} on this machine: on PATH (a pyenv shim too), Debian's, or a pyenv/uv-managed one."""
    candidates = [shutil.which(f"python{version}"), f"/usr/bin/python{version}"]
    for pattern in (f"/root/.pyenv/versions/{version}*/bin/python{version}",
                    os.path.expanduser(f"~/.local/share/uv/python/cpython-{version}*/bin/python{version}")):
        candidates += sorted(glob.glob(pattern))
    for candidate in candidates:
        if candidate and Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return Path(candidate)
    raise RuntimeError(f"SkyPilot's runtime on the Slurm node needs a python{version} (it runs "
                       f"`uv venv --python {version}`), and this machine has none it can find offline.")
