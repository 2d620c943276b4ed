"""The SSH backend against a real OpenSSH sshd on 127.0.0.1 (this machine plays the rented one).

The sshd runs as the current user with a throwaway host key and user key. Its second port forces a
PATH without Python, which plays a machine that has none. The "remote" Python is this test's own
interpreter, which already has the training packages, so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cloudtune.backends import registry
from cloudtune.backends.base import RunContext, build_bundle
from cloudtune.backends.ssh import KNOWN_HOSTS_ENV, REMOTE_PYTHON_ENV, SSHState, parse_host
from cloudtune.cli import cli
from cloudtune.errors import CloudtuneError
from cloudtune.events import Events
from cloudtune.ledger import Ledger, machine_name, new_run_id
from cloudtune.lifecycle import Machine, context_for, fetch_outputs
from cloudtune.recipe import load_recipe

from .conftest import REPO, Sshd, demo_recipe_text, free_port, keygen, write_recipe

SECRET_NAME = "CT_SSH_TEST_TOKEN"
SECRET_VALUE = "ct-secret-7f3a9c2e4b1d8a60"


def ssh_recipe(folder: Path, max_steps: int, secrets: tuple[str, ...] = ()) -> Path:
    data = yaml.safe_load(demo_recipe_text(max_steps=max_steps))
    data["outputs"]["dir"] = str(folder / "outputs")
    data["outputs"]["samples"] = []
    if secrets:
        data["secrets"] = list(secrets)
    return write_recipe(folder, yaml.safe_dump(data))


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "cloudtune.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                            env=cli_env(COLUMNS="200"), start_new_session=True)


def wait_for_log(root: Path, pattern: str, timeout: float = 120, process: subprocess.Popen | None = None) -> Path:
    """The remote run's train.log, once it contains pattern."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for log in root.glob("runs/*/train.log"):
            if re.search(pattern, log.read_text(errors="replace")):
                return log
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the CLI exited early with {process.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"no remote train.log matched {pattern!r} within {timeout} s")


def group_alive(pgid: int) -> bool:
    out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout
    return any(int(p) == pgid and not s.startswith("Z") for p, s in (line.split() for line in out.splitlines()))


def kill_ssh_sessions(listener: int) -> int:
    """SIGKILL every per-connection sshd process: the client sees its connection drop."""
    parents, names = {}, {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        pid = int(stat_file.parent.name)
        names[pid] = text[text.index("(") + 1:text.rindex(")")]
        parents[pid] = int(text[text.rindex(")") + 2:].split()[1])

    def under_listener(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == listener:
                return True
        return False

    victims = [pid for pid in parents if names[pid].startswith("sshd") and under_listener(pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


class Recorder(Events):
    def __init__(self, on_progress=None):
        self.phases: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.transfers: list[tuple[str, int, int]] = []
        self.on_progress = on_progress

    def phase(self, name, detail=""):
        self.phases.append((name, detail))

    def warn(self, message):
        self.warnings.append(message)

    def progress(self, label, done, total):
        self.transfers.append((label, done, total))
        if self.on_progress:
            self.on_progress(label, done, total)


def new_context(ct_home: Path) -> RunContext:
    run_id = new_run_id()
    return RunContext(run_id=run_id, machine=machine_name(run_id), work_dir=ct_home / "runs" / run_id,
                      state=SSHState())


def get_backend(name: str, **options):
    return registry.create(name, options)


# ------------------------------------------------------------------------------------------------
# Fast unit checks


def test_host_addresses_parse_with_defaults():
    assert parse_host("alice@10.0.0.5") == ("alice", "10.0.0.5", 22)
    assert parse_host("ssh://bob@gpu.example.com:2222") == ("bob", "gpu.example.com", 2222)
    assert parse_host("carol@[2001:db8::1]:2200") == ("carol", "2001:db8::1", 2200)
    assert parse_host("10.0.0.5:22022")[1:] == ("10.0.0.5", 22022)
    for bad in ("alice@", "alice@host:port", "alice@host:70000", "alice@host/x"):
        with pytest.raises(CloudtuneError, match="not an SSH address"):
            parse_host(bad)


def test_ssh_options_need_the_ssh_backend(tmp_path, ct_home):
    recipe = ssh_recipe(tmp_path, max_steps=1)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--host", "me@127.0.0.1"])
    assert result.exit_code == 2 and "--host only applies to --backend ssh" in result.output
    result = CliRunner().invoke(cli, ["run", str(recipe), "--backend", "ssh"])
    assert result.exit_code == 2 and "needs the machine: --host" in result.output


# ------------------------------------------------------------------------------------------------
# Connection errors: each one clear, exit 2, no traceback


def _expect_refusal(sshd, recipe, args, *needles):
    result = CliRunner().invoke(cli, ["run", "--backend", "ssh", *args, str(recipe)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    print(result.output)  # shown when the test fails
    flat = " ".join(result.output.split())
    for needle in needles:
        assert needle in flat, result.output
    return flat


def test_unknown_host_is_refused_then_trusted_and_recorded(sshd, remote, tmp_path, ct_home, monkeypatch):
    known_hosts = Path(os.environ[KNOWN_HOSTS_ENV])
    known_hosts.write_text("# my hosts\n")
    recipe = ssh_recipe(tmp_path, max_steps=1)
    flat = _expect_refusal(sshd, recipe, ["--host", sshd.address(), "--key", str(sshd.key)],
                           f"[127.0.0.1]:{sshd.port} is not in {known_hosts}", "--trust-new-host")
    assert sshd.host_public.split()[0] in flat
    assert known_hosts.read_text() == "# my hosts\n"  # nothing recorded without consent

    events = Recorder()
    backend = get_backend("ssh", host=sshd.address(), key=sshd.key, trust_new_host=True)
    backend.events = events
    ctx = new_context(ct_home)
    backend.provision(ctx)
    assert backend.teardown(ctx)
    assert known_hosts.read_text() == f"# my hosts\n[127.0.0.1]:{sshd.port} {sshd.host_public}\n"
    assert any("trusted new host" in warning for warning in events.warnings)
    # The recorded key is now simply known: a backend without --trust-new-host connects.
    again = get_backend("ssh", host=sshd.address(), key=sshd.key)
    ctx = new_context(ct_home)
    again.provision(ctx)
    assert again.teardown(ctx) and not Path(ctx.state.remote_dir).exists()


def test_changed_host_key_is_always_refused(sshd, remote, tmp_path):
    keygen(tmp_path / "impostor")
    impostor = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    known_hosts = Path(os.environ[KNOWN_HOSTS_ENV])
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {impostor}\n")
    recipe = ssh_recipe(tmp_path, max_steps=1)
    for extra in ([], ["--trust-new-host"]):
        _expect_refusal(sshd, recipe, ["--host", sshd.address(), "--key", str(sshd.key), *extra],
                        "has CHANGED", "never accepts a changed key", "ssh-keygen -R")
    assert known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} {impostor}\n"


def test_bad_keys_are_refused(sshd, remote, tmp_path):
    recipe = ssh_recipe(tmp_path, max_steps=1)
    keygen(tmp_path / "stranger")
    _expect_refusal(sshd, recipe, ["--host", sshd.address(), "--key", str(tmp_path / "stranger")],
                    "refused the login with the key", "authorized_keys")
    garbage = tmp_path / "garbage"
    garbage.write_text("this is not a key\n")
    _expect_refusal(sshd, recipe, ["--host", sshd.address(), "--key", str(garbage)], "is not a private key")
    _expect_refusal(sshd, recipe, ["--host", sshd.address(), "--key", str(tmp_path / "missing")],
                    "no such file")


def test_unreachable_host_is_a_clear_error(sshd, remote, tmp_path):
    recipe = ssh_recipe(tmp_path, max_steps=1)
    closed = free_port()
    _expect_refusal(sshd, recipe, ["--host", f"{sshd.user}@127.0.0.1:{closed}", "--key", str(sshd.key)],
                    f"cannot reach 127.0.0.1:{closed} (Connection refused)", "firewall")


def test_machine_without_python_is_a_clear_error(sshd, remote, tmp_path, monkeypatch):
    monkeypatch.delenv(REMOTE_PYTHON_ENV)
    recipe = ssh_recipe(tmp_path, max_steps=1)
    _expect_refusal(sshd, recipe, ["--host", sshd.address(sshd.no_python_port), "--key", str(sshd.key)],
                    "has no usable Python", "neither python3 nor python", "apt-get install")


def test_errors_from_the_console_script_have_no_traceback(sshd, remote, tmp_path):
    Path(os.environ[KNOWN_HOSTS_ENV]).write_text("")
    recipe = ssh_recipe(tmp_path, max_steps=1)
    done = subprocess.run([sys.executable, "-m", "cloudtune.cli", "run", "--backend", "ssh", "--host",
                           sshd.address(), "--key", str(sshd.key), str(recipe)],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert "is not in" in done.stderr and "--trust-new-host" in done.stderr


# ------------------------------------------------------------------------------------------------
# Upload: resumable and skipped when already there


def _big_bundle(tmp_path: Path, backend, ctx) -> tuple:
    recipe = load_recipe(ssh_recipe(tmp_path, max_steps=1))
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 << 20))  # incompressible, so the upload takes many chunks
    files = {**backend.bundle_files(ctx), "blob.bin": blob}
    return build_bundle(recipe, tmp_path / "bundle.tar.gz", files)


def test_interrupted_upload_resumes_and_a_finished_one_is_skipped(sshd, remote, tmp_path, ct_home):
    first = get_backend("ssh", host=sshd.address(), key=sshd.key)
    ctx = new_context(ct_home)
    first.provision(ctx)
    bundle = _big_bundle(tmp_path, first, ctx)
    size = bundle.path.stat().st_size
    partial = remote / "bundles" / f"{bundle.sha256}.tar.gz.part"

    def interrupt(label, done, total):
        if label == "upload" and done > total // 3:
            raise KeyboardInterrupt  # the user gives up (or the CLI dies) a third of the way in

    first.events = Recorder(interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.sync(ctx, bundle, {})
    first.teardown(ctx)
    left = partial.stat().st_size
    assert 0 < left < size

    # The next run finds the partial upload and sends only the rest.
    second = get_backend("ssh", host=sshd.address(), key=sshd.key)
    second.events = Recorder()
    ctx = new_context(ct_home)
    second.provision(ctx)
    second.sync(ctx, bundle, {})
    uploads = [done for label, done, _ in second.events.transfers if label == "upload"]
    assert uploads[0] == left and uploads[-1] == size
    assert any("resuming at" in detail for _, detail in second.events.phases)
    assert not partial.exists()
    assert (remote / "bundles" / f"{bundle.sha256}.tar.gz").read_bytes() == bundle.path.read_bytes()
    assert (Path(ctx.state.remote_dir) / "bundle" / "blob.bin").stat().st_size == 3 << 20
    assert (Path(ctx.state.remote_dir) / "site" / "cloudtune" / "__init__.py").is_file()
    assert second.teardown(ctx)

    # A re-run with the same bundle uploads nothing.
    third = get_backend("ssh", host=sshd.address(), key=sshd.key)
    third.events = Recorder()
    ctx = new_context(ct_home)
    third.provision(ctx)
    third.sync(ctx, bundle, {})
    assert not [t for t in third.events.transfers if t[0] == "upload"]
    assert ("upload", "skipped: the machine already has this bundle (sha256 matches)") in third.events.phases
    assert third.teardown(ctx)


def test_upload_survives_a_dropped_connection(sshd, remote, tmp_path, ct_home):
    backend = get_backend("ssh", host=sshd.address(), key=sshd.key)
    ctx = new_context(ct_home)
    backend.provision(ctx)
    bundle = _big_bundle(tmp_path, backend, ctx)
    dropped = []

    def drop(label, done, total):
        if label == "upload" and done > total // 2 and not dropped:
            dropped.append(done)
            backend.connection.client.get_transport().close()  # the network goes away mid-transfer

    backend.events = Recorder(drop)
    backend.sync(ctx, bundle, {})
    uploads = [done for label, done, _ in backend.events.transfers if label == "upload"]
    restart = uploads[uploads.index(dropped[0]) + 1]
    assert 0 < restart <= dropped[0]  # resumed from what had arrived, not from zero
    assert any("lost while uploading" in warning for warning in backend.events.warnings)
    assert (remote / "bundles" / f"{bundle.sha256}.tar.gz").read_bytes() == bundle.path.read_bytes()
    assert backend.teardown(ctx)


def test_secrets_file_is_private(sshd, remote, tmp_path, ct_home):
    backend = get_backend("ssh", host=sshd.address(), key=sshd.key, keep_remote=True)
    ctx = new_context(ct_home)
    backend.provision(ctx)
    bundle = build_bundle(load_recipe(ssh_recipe(tmp_path, max_steps=1)), tmp_path / "b.tar.gz",
                          backend.bundle_files(ctx))
    backend.sync(ctx, bundle, {SECRET_NAME: "it's a 'quoted' secret value"})
    secrets_file = Path(ctx.state.remote_dir) / "secrets.env"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    assert Path(ctx.state.remote_dir).stat().st_mode & 0o077 == 0
    sourced = subprocess.run(["sh", "-c", f". {secrets_file}; printf %s \"${SECRET_NAME}\""],
                             capture_output=True, text=True).stdout
    assert sourced == "it's a 'quoted' secret value"
    assert backend.teardown(ctx)
    kept = Path(ctx.state.remote_dir)
    assert kept.is_dir() and not secrets_file.exists()  # kept, minus the secrets and the copy of the data
    assert not (kept / "bundle").exists()


def test_missing_packages_get_a_venv_built_once(sshd, remote, tmp_path, ct_home, monkeypatch):
    # A Python without the packages (this venv's base interpreter) and one requirement that pip can
    # install offline: a wheel built here. The venv sees the base's own packages too.
    base = getattr(sys, "_base_executable", sys.executable)
    monkeypatch.setenv(REMOTE_PYTHON_ENV, base)
    source = tmp_path / "probe-src"
    (source / "ct_venv_probe").mkdir(parents=True)
    (source / "ct_venv_probe" / "__init__.py").write_text("ANSWER = 42\n")
    (source / "pyproject.toml").write_text('[project]\nname = "ct-venv-probe"\nversion = "1.0"\n'
                                          '[build-system]\nrequires = ["setuptools"]\n'
                                          'build-backend = "setuptools.build_meta"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True)
    wheel = next((tmp_path / "dist").glob("ct_venv_probe-*.whl"))
    requirements = [f"ct-venv-probe @ {wheel.as_uri()}", "pip"]

    backend = get_backend("ssh", host=sshd.address(), key=sshd.key)
    backend.events = Recorder()
    ctx = new_context(ct_home)
    backend.provision(ctx)
    assert backend.environment(ctx).prepare(["pip"]) == ctx.state.base_python  # nothing missing: no venv
    python = backend.environment(ctx).prepare(requirements)
    assert Path(python).parent.parent.parent == remote / "envs"
    ready = Path(python).parent.parent / ".ready"
    built = ready.stat().st_mtime_ns
    answer = subprocess.run([python, "-c", "import ct_venv_probe; print(ct_venv_probe.ANSWER)"],
                            capture_output=True, text=True)
    assert answer.stdout.strip() == "42", answer.stderr
    assert "include-system-site-packages = true" in (Path(python).parent.parent / "pyvenv.cfg").read_text()
    assert backend.environment(ctx).prepare(requirements) == python  # the next run reuses it
    assert ready.stat().st_mtime_ns == built
    assert backend.teardown(ctx)


# ------------------------------------------------------------------------------------------------
# Training over SSH, end to end


@dataclass
class Watcher:
    """Samples `ps` while a run trains; drops the SSH connection once, mid-training, when asked to."""

    remote_root: Path
    sshd: Sshd
    drop_at: str | None = None
    samples: int = 0
    leaks: list[str] = field(default_factory=list)
    training_seen: bool = False
    secret_in_training_env: bool = False
    dropped: int = 0
    containers: set[str] | None = None  # when a set: the names of the Docker containers seen running
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        while not self.stop.is_set():
            if self.containers is not None:
                names = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True, text=True)
                self.containers.update(names.stdout.split())
            # -ww: whole command lines; ps cuts them at COLUMNS even into a pipe, hiding a leak past the cut
            listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            self.samples += 1
            if SECRET_VALUE in listing:
                self.leaks.append(listing)
            for line in listing.splitlines():
                pid, _, args = line.strip().partition(" ")
                if "-m cloudtune.train" in args:
                    self.training_seen = True
                    try:
                        environ = Path(f"/proc/{pid}/environ").read_bytes()
                    except OSError:
                        continue
                    if f"{SECRET_NAME}={SECRET_VALUE}".encode() in environ:
                        self.secret_in_training_env = True
            if self.drop_at and not self.dropped:
                logs = list(self.remote_root.glob("runs/*/train.log"))
                if logs and self.drop_at in logs[0].read_text(errors="replace"):
                    self.dropped = kill_ssh_sessions(self.sshd.process.pid)
            time.sleep(0.25)


def assert_secret_in_no_file(*folders: Path) -> None:
    for path in (path for folder in folders for path in folder.rglob("*")):
        if path.is_file() and "models" not in path.parts:
            assert SECRET_VALUE.encode() not in path.read_bytes(), path


def test_train_over_ssh_end_to_end(sshd, remote, tmp_path, ct_home, monkeypatch):
    from cloudtune.train.model import model_source
    from cloudtune.train.verify import TOLERANCE, max_logit_difference

    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    steps = 20
    recipe_path = ssh_recipe(tmp_path, max_steps=steps, secrets=(SECRET_NAME,))
    watcher = Watcher(remote, sshd, drop_at="step 8/")
    thread = threading.Thread(target=watcher.watch, daemon=True)
    thread.start()
    try:
        result = CliRunner(mix_stderr=False).invoke(cli, ["run", "--backend", "ssh", "--host", sshd.address(),
                                                          "--key", str(sshd.key), "--keep-remote", "--json",
                                                          str(recipe_path)])
    finally:
        watcher.stop.set()
        thread.join()
    assert result.exit_code == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert receipt["backend"] == "ssh" and receipt["steps"] == steps

    # The connection dropped mid-training; the stream reconnected and lost or repeated no line.
    assert watcher.dropped >= 1
    # (rich wraps long lines to the terminal, and how long this one is depends on where it dropped)
    assert re.search(r"connection to 127\.0\.0\.1 lost.*; reconnecting", " ".join(result.stderr.split())), \
        result.stderr
    for step in range(1, steps + 1):
        assert result.stderr.count(f"step {step}/{steps} ") == 1, result.stderr

    # The adapter came back whole and reproduces the trained model's logits.
    out = Path(receipt["output_dir"])
    recipe = load_recipe(recipe_path)
    assert max_logit_difference(out, model_source(recipe)) <= TOLERANCE

    # The secret reached the training process, through the private file only.
    assert watcher.training_seen and watcher.samples > 10
    assert watcher.secret_in_training_env
    assert not watcher.leaks, "the secret showed in `ps`"
    assert SECRET_VALUE not in result.stdout + result.stderr
    assert_secret_in_no_file(ct_home, remote, out)
    run = Ledger().get_run(receipt["run_id"])
    remote_dir = Path(Ledger().machine_for_run(run["id"])["meta"]["remote_dir"])
    assert remote_dir.parent == remote / "runs"
    assert (remote_dir / "train.log").is_file() and (remote_dir / "out" / "manifest.json").is_file()
    assert not (remote_dir / "secrets.env").exists()  # --keep-remote keeps the outputs, never the secrets
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated"

    # A corrupted remote output is caught on pull, and nothing lands in the output directory.
    adapter = remote_dir / "out" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"oops")
    backend = get_backend("ssh")
    ctx = context_for(backend, Machine.from_row(Ledger().machine_for_run(run["id"])))
    target = tmp_path / "second-pull"
    with pytest.raises(CloudtuneError, match="checksum mismatch.*adapter/adapter_model.safetensors") as caught:
        fetch_outputs(backend, ctx, target)
    assert not target.exists()
    assert f"stay on {sshd.address()} in {remote_dir}/out" in caught.value.hint
    assert ctx.state.keep_remote  # so teardown keeps the machine's copy, the only one left
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(CloudtuneError, match="checksum mismatch"):
        fetch_outputs(backend, ctx, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_logs_reattach_after_the_cli_dies_and_down_cleans_up(sshd, remote, tmp_path, ct_home):
    steps = 20
    recipe_path = ssh_recipe(tmp_path, max_steps=steps)
    cli_log = tmp_path / "cli.log"
    process = start_cli(["run", "--backend", "ssh", "--host", sshd.address(), "--key", str(sshd.key),
                         str(recipe_path)], cli_log)
    train_log = wait_for_log(remote, r"step [2-4]/", process=process)
    os.killpg(process.pid, signal.SIGKILL)  # the laptop's lid closes: client and connection gone at once
    process.wait()
    assert "done:" not in train_log.read_text()

    run = Ledger().runs(1)[0]
    assert run["status"] == "running" and run["backend"] == "ssh"
    result = CliRunner().invoke(cli, ["logs", run["id"], "-f"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "device: cpu" in lines
    assert [line for line in lines if line.startswith("step ")][-1].startswith(f"step {steps}/{steps} ")
    assert lines[-1].startswith("done:")
    assert (train_log.parent / "exit_code").read_text().strip() == "0"
    assert (train_log.parent / "out" / "adapter" / "adapter_model.safetensors").is_file()

    result = CliRunner().invoke(cli, ["down", run["id"], "--yes"])
    assert result.exit_code == 0 and "terminated" in result.output, result.output
    assert not train_log.parent.exists()
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated"
    # The log outlives the machine: a copy was kept at teardown.
    result = CliRunner().invoke(cli, ["logs", run["id"]])
    assert result.exit_code == 0 and result.output.splitlines()[-1].startswith("done:")


def test_down_stops_the_remote_training(sshd, remote, tmp_path, ct_home):
    # Bundles of earlier runs, oldest first, and two unfinished uploads: one abandoned, one under way.
    bundles = remote / "bundles"
    bundles.mkdir()
    now = time.time()
    for age in range(5):
        old = bundles / f"{age:064x}.tar.gz"
        old.write_bytes(b"earlier bundle")
        os.utime(old, (now - 3600 * (10 - age), now - 3600 * (10 - age)))
    (bundles / "abandoned.tar.gz.part").write_bytes(b"half")
    os.utime(bundles / "abandoned.tar.gz.part", (now - 2 * 86400, now - 2 * 86400))
    (bundles / "uploading.tar.gz.part").write_bytes(b"half")
    recipe_path = ssh_recipe(tmp_path, max_steps=100000)
    process = start_cli(["run", "--backend", "ssh", "--host", sshd.address(), "--key", str(sshd.key),
                         str(recipe_path)], tmp_path / "cli.log")
    deadline = time.time() + 120
    while not (Ledger().runs(1) and Ledger().runs(1)[0]["status"] == "running"):
        assert time.time() < deadline and process.poll() is None, (tmp_path / "cli.log").read_text()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run = Ledger().runs(1)[0]
    state = Ledger().machine_for_run(run["id"])["meta"]
    pgid, remote_dir = state["pid"], Path(state["remote_dir"])
    assert group_alive(pgid), "the training should outlive the CLI"

    result = CliRunner().invoke(cli, ["down", run["id"], "--yes"])
    assert result.exit_code == 0 and "terminated" in result.output, result.output
    assert not group_alive(pgid)
    assert not remote_dir.exists()
    assert Ledger().get_run(run["id"])["status"] == "cancelled"
    # This run's bundle and the two newest earlier ones stay for re-runs; the rest and the abandoned upload go.
    left = {p.name for p in bundles.iterdir()}
    earlier = {f"{age:064x}.tar.gz" for age in range(5)}
    this_run = left - earlier - {"uploading.tar.gz.part"}
    assert left & earlier == {f"{3:064x}.tar.gz", f"{4:064x}.tar.gz"} and "uploading.tar.gz.part" in left, left
    assert len(this_run) == 1 and re.fullmatch(r"[0-9a-f]{64}\.tar\.gz", this_run.pop()), left


def test_max_cost_holds_on_a_machine_with_a_price(sshd, remote, tmp_path, ct_home):
    recipe_path = ssh_recipe(tmp_path, max_steps=100000)
    data = yaml.safe_load(recipe_path.read_text())
    data["compute"] = {"price_per_hour": 3600, "max_cost": 10}  # ten seconds of training, counted on the machine
    recipe_path.write_text(yaml.safe_dump(data))
    result = CliRunner(mix_stderr=False).invoke(cli, ["run", "--backend", "ssh", "--host", sshd.address(),
                                                      "--key", str(sshd.key), "--json", str(recipe_path)])
    assert result.exit_code == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert 1 <= receipt["budget_stop"]["stopped_at_step"] < 100000 and receipt["steps"] < 100000
    assert receipt["estimate"]["usd_per_hour"] == 3600 and receipt["actual_cost_usd"] > 0
    assert Path(receipt["weights_path"], "adapter_model.safetensors").is_file()
    assert "is spent after step" in result.stderr


def test_a_training_whose_wrapper_is_killed_stops_instead_of_running_unwatched(sshd, remote, tmp_path, ct_home):
    recipe_path = ssh_recipe(tmp_path, max_steps=100000)
    process = start_cli(["run", "--backend", "ssh", "--host", sshd.address(), "--key", str(sshd.key),
                         str(recipe_path)], tmp_path / "cli.log")
    train_log = wait_for_log(remote, r"step [1-9]", process=process)
    wrapper = Ledger().machine_for_run(Ledger().runs(1)[0]["id"])["meta"]["pid"]  # run.sh, the group's leader
    os.kill(wrapper, signal.SIGKILL)
    deadline = time.time() + 60
    while group_alive(wrapper) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_alive(wrapper), "the trainer ran on after its wrapper was killed"
    assert "is gone; stopping with a checkpoint" in train_log.read_text()
    assert process.wait(timeout=120) == 1  # the run failed (no exit status), and was torn down
    assert Ledger().machine_for_run(Ledger().runs(1)[0]["id"])["status"] == "terminated"
