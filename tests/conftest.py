"""Shared fixtures. Every test gets its own CLOUDTUNE_HOME and no network."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "tasks" / "demo-tiny.yaml"

# Keep every library offline: nothing here may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")  # its usage logging posts to a public host
# MKL picks its sgemm path by the memory alignment of each array, so the same CPU run can differ in the
# last bits between two processes; its reproducible mode keeps resume tests comparing like with like.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# A suite started in the background by a shell without job control (`make test &`, some CI runners)
# ignores SIGINT, every child inherits that, and Python then installs no KeyboardInterrupt handler: the
# CLIs the tests Ctrl-C would never see it. A handler (unlike SIG_IGN) is reset to the default on exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def sky_env(home: Path, ct_home: Path) -> dict:
    """The environment of a CLI process whose SkyPilot state lives under `home`, never in the real ~/.sky
    (tests/test_skypilot.py needs sky imported first under its own HOME)."""
    env = {k: v for k, v in os.environ.items() if k != "SKY_RUNTIME_DIR"}
    return {**env, "HOME": str(home), "CLOUDTUNE_HOME": str(ct_home), "PYTHONPATH": str(REPO),
            "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1"}


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    """One CLOUDTUNE_HOME for the session's model cache, so the tiny model is written once."""
    return tmp_path_factory.mktemp("cloudtune-models")


@contextmanager
def module_home(shared_home: Path, tmp_path_factory):
    """A CLOUDTUNE_HOME for module-scoped fixtures, which run before the per-test one exists."""
    home = tmp_path_factory.mktemp("module-home")
    (home / "models").symlink_to(shared_home, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLOUDTUNE_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def ct_home(tmp_path, shared_home, monkeypatch) -> Path:
    home = tmp_path / "ct-home"
    home.mkdir()
    (home / "models").symlink_to(shared_home, target_is_directory=True)
    monkeypatch.setenv("CLOUDTUNE_HOME", str(home))
    return home


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def demo_recipe_text(**training) -> str:
    """The demo recipe with a few training fields overridden (e.g. fewer steps for speed)."""
    import yaml

    data = yaml.safe_load(DEMO_RECIPE.read_text())
    data["dataset"]["path"] = str(DEMO_RECIPE.parent / "data" / "demo-chat.jsonl")
    data["training"].update(training)
    return yaml.safe_dump(data)


# `cloudtune run` rents through SkyPilot by default; tests train on this machine unless they say otherwise.
os.environ.setdefault("CLOUDTUNE_BACKEND", "local")


# ------------------------------------------------------------------------------------------------
# A real sshd for the SSH backend's tests (test_ssh.py, test_ssh_docker.py)


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    no_python_port: int
    user: str
    key: Path
    host_public: str  # "ssh-ed25519 AAAA..."
    folder: Path
    process: subprocess.Popen

    def address(self, port: int | None = None) -> str:
        return f"{self.user}@127.0.0.1:{port or self.port}"

    def known_hosts_lines(self) -> str:
        return "".join(f"[127.0.0.1]:{port} {self.host_public}\n" for port in (self.port, self.no_python_port))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudtune-test", "-f", str(path)],
                   check=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    if not Path(SSHD).exists():
        pytest.fail("OpenSSH sshd is not installed: run `make system-packages` (apt-get install -y openssh-server).")
    folder = tmp_path_factory.mktemp("sshd")
    keygen(folder / "host_key")
    keygen(folder / "user_key")
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    no_python = folder / "no-python.sh"
    no_python.write_text('#!/bin/sh\nPATH=/nonexistent exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    no_python.chmod(0o755)
    port, no_python_port = free_port(), free_port()
    config = folder / "sshd_config"
    config.write_text(f"""
Port {port}
Port {no_python_port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
Subsystem sftp internal-sftp
LogLevel ERROR
Match LocalPort {no_python_port}
    ForceCommand {no_python}
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd insists on its privilege-separation directory
    log = (folder / "sshd.log").open("w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                if conn.recv(64).startswith(b"SSH-2.0"):
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"sshd did not start:\n{(folder / 'sshd.log').read_text()}")
        time.sleep(0.1)
    host_public = " ".join((folder / "host_key.pub").read_text().split()[:2])
    server = Sshd(port, no_python_port, os.environ.get("USER") or _current_user(), folder / "user_key", host_public,
                  folder, process)
    yield server
    process.terminate()
    process.wait(timeout=10)
    log.close()


def _current_user() -> str:
    import getpass

    return getpass.getuser()


@pytest.fixture(scope="session")
def remote_models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("remote-models")


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture
def remote(sshd, tmp_path, ct_home, monkeypatch, remote_models, wheel_cache) -> Path:
    """Known hosts, remote root and remote Python for one test; returns the remote root."""
    from cloudtune.backends.ssh import KNOWN_HOSTS_ENV, REMOTE_PYTHON_ENV, REMOTE_ROOT_ENV

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_lines())
    root = tmp_path / "remote-root"
    root.mkdir()
    (root / "models").symlink_to(remote_models, target_is_directory=True)  # the tiny model is written once
    (ct_home / "wheels").symlink_to(wheel_cache, target_is_directory=True)  # and the wheel built once
    monkeypatch.setenv(KNOWN_HOSTS_ENV, str(known_hosts))
    monkeypatch.setenv(REMOTE_ROOT_ENV, str(root))
    monkeypatch.setenv(REMOTE_PYTHON_ENV, sys.executable)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # only the keys a test names may log in
    return root


def process_group_alive(pgid: int) -> bool:
    """Any process of the group still running (zombies have ended; they wait only to be reaped)."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout
    return any(int(p) == pgid and not s.startswith("Z") for p, s in (line.split() for line in out.splitlines()))


# ------------------------------------------------------------------------------------------------
# A one-node Slurm on 127.0.0.1 and a HOME for the real SkyPilot client (test_skypilot_slurm.py)


@pytest.fixture(scope="session")
def slurm_sky():
    """The localhost Slurm (tests/slurm_cluster.py), started once a session, with a SkyPilot client HOME
    that has checked it; at the end every cluster of that HOME goes down, its API server stops, and the
    node user's jobs, processes and the daemons stop by their PIDs."""
    import tempfile

    from .slurm_cluster import SkyHome, SlurmCluster, missing_packages

    if os.geteuid() != 0:
        pytest.skip("the localhost Slurm needs root (slurmd, a user of its own); `make test` runs as root in CI")
    if missing_packages():
        pytest.fail(f"missing {', '.join(missing_packages())}: run `make system-packages` (apt-get install -y "
                    "slurmctld slurmd slurm-client munge patchelf).")
    scratch = Path(tempfile.mkdtemp(prefix="cloudtune-slurm-"))
    cluster = SlurmCluster(scratch)
    client = SkyHome(cluster, scratch / "client-home")
    started = time.time()
    try:
        cluster.start()
        client.start()
        print(f"\nlocalhost Slurm and SkyPilot client ready in {time.time() - started:.0f} s ({scratch}): "
              f"{cluster.timings}")
        yield client
    finally:
        try:
            client.stop()
        finally:
            cluster.stop()
            shutil.rmtree(scratch, ignore_errors=True)
