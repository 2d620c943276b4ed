"""The programs the SSH backend runs on the machine, run here with subprocess: each through the exact
command line commands.py builds (as transport.Connection.run sends it: `/bin/sh -c COMMAND`).

Docker's scripts run against a stand-in `docker` on the PATH that records its arguments and answers as
an engine would; the real engine is tests/test_ssh_docker.py's.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudtune.backends.ssh import commands
from cloudtune.backends.ssh.commands import MARK
from cloudtune.remote import missing_requirements, stop_group

from .conftest import REPO

SCRIPTS = REPO / "cloudtune" / "backends" / "ssh" / "scripts"


def run_here(command: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def answer(done: subprocess.CompletedProcess) -> str | None:
    return commands.marked(done.stdout + done.stderr)


def test_every_script_is_a_file_the_package_ships():
    names = sorted(path.name for path in SCRIPTS.iterdir() if path.suffix in (".sh", ".py"))
    assert {"probe.sh", "probe.py", "start_detached.sh", "docker_stop.sh"} <= set(names)
    for name in names:
        assert commands.source(name) == (SCRIPTS / name).read_text()
    assert commands.source("remote:stop_group") == Path(stop_group.__file__).read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"cloudtune.remote"' in pyproject
    assert '"cloudtune.backends.ssh" = ["scripts/*.py", "scripts/*.sh"]' in pyproject


def test_the_options_import_no_paramiko():
    code = ("import sys, cloudtune.backends.ssh.options as o; o.SSHOptions(host='a@b'); "
            "print('paramiko' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                          "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "False", done.stderr


# ------------------------------------------------------------------------------------------------
# probe


def _probe(python: str, root: Path, run_id: str = "r1", version: tuple[int, int] = (3, 10), **env):
    command = commands.sh("probe.sh", MARK, python, commands.source("probe.py"), root, run_id, *version)
    return run_here(command, env=env)


def test_probe_finds_python_and_makes_the_run_directory(tmp_path):
    found = json.loads(answer(_probe(sys.executable, tmp_path / "root")))
    run = tmp_path / "root" / "runs" / "r1"
    assert found == {"python": sys.executable, "version": ".".join(map(str, sys.version_info[:3])),
                     "root": str((tmp_path / "root").resolve()), "run": str(run.resolve())}
    assert run.stat().st_mode & 0o777 == 0o700 and (tmp_path / "root" / "bundles").is_dir()
    # No interpreter named: the PATH's python3.
    assert json.loads(answer(_probe("", tmp_path / "root", "r2")))["run"].endswith("/runs/r2")


def test_probe_says_when_python_is_missing_or_too_old(tmp_path):
    assert answer(_probe("/nonexistent/python3", tmp_path)) == "no-python"
    assert answer(_probe("", tmp_path, PATH="/nonexistent")) == "no-python"
    too_old = json.loads(answer(_probe(sys.executable, tmp_path / "root", version=(99, 0))))
    assert too_old["run"] is None and not (tmp_path / "root").exists()


# ------------------------------------------------------------------------------------------------
# cloudtune.remote: which requirements are missing, stopping a process group


def test_missing_requirements_as_a_shipped_file_and_as_a_module():
    wanted = ["pip", "pip>=999", "surely-not-installed-ct", "surely-not-installed-ct2; python_version < '3'",
              "pydantic[email]>=2"]
    expected = ["pip>=999", "surely-not-installed-ct"]
    assert missing_requirements.missing(wanted) == expected
    shipped = run_here(commands.python(sys.executable, "remote:missing_requirements", json.dumps(wanted), MARK))
    assert json.loads(answer(shipped)) == expected
    module = subprocess.run([sys.executable, "-m", "cloudtune.remote.missing_requirements", json.dumps(wanted)],
                            capture_output=True, text=True, cwd=REPO)
    assert json.loads(module.stdout) == expected


def _group(script: str) -> subprocess.Popen:
    """A process group of sh and its child, as the training is."""
    child = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.3)
    return child


def test_stop_group_terms_then_kills_and_checks(tmp_path):
    polite = _group("sleep 30 & wait")
    stubborn = _group("trap '' TERM; sh -c \"trap '' TERM; sleep 30\" & wait")
    try:
        check = run_here(commands.python(sys.executable, "remote:stop_group", stubborn.pid, "check", MARK))
        assert answer(check) == "alive"
        started = time.time()
        assert stop_group.stop_group(polite.pid, 10)
        assert time.time() - started < 5, "a group that goes on TERM is not waited for"
        started = time.time()
        stopped = run_here(commands.python(sys.executable, "remote:stop_group", stubborn.pid, 1, MARK))
        assert answer(stopped) == "gone" and time.time() - started >= 1, "KILLed after the grace"
        module = subprocess.run([sys.executable, "-m", "cloudtune.remote.stop_group", str(stubborn.pid), "check"],
                                capture_output=True, text=True, cwd=REPO)
        assert module.stdout.strip() == "gone"
    finally:
        for child in (polite, stubborn):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def test_stop_group_usage():
    done = subprocess.run([sys.executable, "-m", "cloudtune.remote.stop_group", "x"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and "usage" in done.stderr


# ------------------------------------------------------------------------------------------------
# venv, start, sha256, cleanup


def test_make_venv_builds_once(tmp_path):
    venv = tmp_path / "envs" / "abc"
    command = commands.python(sys.executable, "remote:make_venv", MARK, venv, json.dumps(["pip"]))
    first = run_here(command, timeout=300)
    assert answer(first) == f"{venv}/bin/python", first.stdout + first.stderr
    ready = (venv / ".ready").stat().st_mtime_ns
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert answer(run_here(command)) == f"{venv}/bin/python"
    assert (venv / ".ready").stat().st_mtime_ns == ready


def test_start_detached_runs_run_sh_in_its_own_session(tmp_path):
    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "exit_code").write_text("1\n")  # a previous attempt's
    (run / "bundle" / "run.sh").write_text('printf "%s\\n" "$CT_TEST_VALUE" "$*" $(ps -o sid= -p $$) > seen\n'
                                           'sleep 1\necho 0 > exit_code\n')
    done = run_here(commands.with_env({"CT_TEST_VALUE": "it's here"},
                                      commands.sh("start_detached.sh", MARK, run, "--resume")))
    pid = answer(done)
    assert pid and pid.isdigit() and (run / "pid").read_text().strip() == pid
    assert not (run / "exit_code").exists()
    deadline = time.time() + 10
    while not (run / "exit_code").exists() and time.time() < deadline:
        time.sleep(0.1)
    value, resume, session = (run / "seen").read_text().splitlines()
    assert (value, resume, int(session)) == ("it's here", "--resume", int(pid)), "the pid is the session's id"


def test_sha256_of_a_remote_file(tmp_path):
    path = tmp_path / "a file"
    path.write_bytes(b"bundle bytes")
    found = answer(run_here(commands.sh("sha256.sh", MARK, path)))
    assert found.split()[0] == hashlib.sha256(b"bundle bytes").hexdigest()
    assert answer(run_here(commands.sh("sha256.sh", MARK, tmp_path / "missing"))) is None


def test_cleanup_removes_the_run_and_prunes_bundles(tmp_path):
    run, bundles = tmp_path / "runs" / "r1", tmp_path / "bundles"
    (run / "out").mkdir(parents=True)
    bundles.mkdir()
    now = time.time()
    for age in range(5):
        path = bundles / f"b{age}.tar.gz"
        path.write_text("x")
        os.utime(path, (now - age * 60, now - age * 60))
    (bundles / "old.tar.gz.part").write_text("x")
    os.utime(bundles / "old.tar.gz.part", (now - 2 * 86400, now - 2 * 86400))
    (bundles / "new.tar.gz.part").write_text("x")
    done = run_here(commands.sh("cleanup.sh", MARK, bundles, 3, run))
    assert commands.marks(done.stdout) == ["removed"] and not run.exists()
    assert sorted(p.name for p in bundles.iterdir()) == ["b0.tar.gz", "b1.tar.gz", "b2.tar.gz", "new.tar.gz.part"]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "stays").write_text("x")
    (tmp_path / "kept").chmod(0o500)  # rm cannot remove the file inside
    try:
        if os.geteuid() != 0:
            said = commands.marks(run_here(commands.sh("cleanup.sh", MARK, bundles, 3, tmp_path / "kept/stays")).stdout)
            assert said == ["left"]
    finally:
        (tmp_path / "kept").chmod(0o700)


# ------------------------------------------------------------------------------------------------
# Docker's scripts, against a stand-in docker


@pytest.fixture
def fake_docker(tmp_path) -> tuple[dict[str, str], Path]:
    """A PATH whose `docker` logs its arguments (one call a line) and answers like an engine."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$1" in
  version) [ -n "$FAKE_DOCKER_DOWN" ] && {{ echo "Cannot connect to the Docker daemon" >&2; exit 1; }}; echo 27.1.0;;
  inspect) [ -n "$FAKE_RUNNING" ] && echo true || echo false;;
  image) [ -n "$FAKE_HAVE_IMAGE" ];;
  run) echo 0123abcd;;
esac
""")
    (bin_dir / "docker").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}, calls


def test_docker_check_reports_engine_user_and_gpus(fake_docker):
    env, _ = fake_docker
    said = commands.marks(run_here(commands.sh("docker_check.sh", MARK), env=env).stdout)
    assert said == ["docker 27.1.0", f"user {os.getuid()}:{os.getgid()}"]
    down = run_here(commands.sh("docker_check.sh", MARK), env={**env, "FAKE_DOCKER_DOWN": "1"})
    assert commands.marks(down.stdout) == [f"user {os.getuid()}:{os.getgid()}"]
    assert "Cannot connect to the Docker daemon" in down.stdout


def test_docker_pull_only_when_the_image_is_missing(fake_docker):
    env, calls = fake_docker
    run_here(commands.sh("docker_pull.sh", "img:1"), env={**env, "FAKE_HAVE_IMAGE": "1"})
    run_here(commands.sh("docker_pull.sh", "img:1"), env=env)
    assert calls.read_text().splitlines() == ["image inspect img:1", "image inspect img:1", "pull img:1"]


def test_docker_start_and_stop(fake_docker, tmp_path):
    env, calls = fake_docker
    (tmp_path / "exit_code").write_text("0\n")
    started = run_here(commands.sh("docker_start.sh", MARK, tmp_path, "cloudtune-r1", "--resume", "-e", "A=b c",
                                   "img:1"), env=env)
    assert answer(started) == "0123abcd" and not (tmp_path / "exit_code").exists()
    assert calls.read_text().splitlines() == [
        "rm -f cloudtune-r1", "run -d --rm --init --name cloudtune-r1 -e A=b c img:1 sh bundle/run.sh --resume"]
    calls.unlink()
    assert answer(run_here(commands.sh("docker_stop.sh", MARK, "cloudtune-r1", "check"),
                           env={**env, "FAKE_RUNNING": "1"})) == "alive"
    assert answer(run_here(commands.sh("docker_stop.sh", MARK, "cloudtune-r1", 7), env=env)) == "gone"
    assert calls.read_text().splitlines() == [
        "inspect --format {{.State.Running}} cloudtune-r1", "stop -t 7 cloudtune-r1", "rm -f cloudtune-r1",
        "inspect --format {{.State.Running}} cloudtune-r1"]
