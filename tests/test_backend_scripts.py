"""The programs the machines run (backends/scripts/), run here with stand-ins for python and pip.

The SSH backend's own programs are tested in test_ssh_scripts.py; these are the bundle's run.sh
(local and SSH backends) and SkyPilot's setup and run steps.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudtune.backends.skypilot import script
from cloudtune.remote.watchdog import process_alive
from cloudtune.train.checkpoint import COMPLETE

REPO = Path(__file__).resolve().parent.parent
# A python3 that records how it was called, and what a secret looked like inside it, then exits $STUB_EXIT.
STUB = """#!/bin/sh
echo "args: $*" >> "$STUB_LOG"
echo "token: ${CT_TEST_TOKEN:-unset}" >> "$STUB_LOG"
echo "launcher: ${CLOUDTUNE_LAUNCHER_PID:-unset} parent: $PPID" >> "$STUB_LOG"
echo "trainer output"
exit "${STUB_EXIT:-0}"
"""


def stub_python(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return stub


def test_run_sh_reads_secrets_from_the_file_logs_and_records_the_exit_status(tmp_path):
    machine = tmp_path / "machine"
    (machine / "bundle").mkdir(parents=True)
    (machine / "bundle" / "run.sh").write_text((REPO / "cloudtune/backends/scripts/run.sh").read_text())
    (machine / "secrets.env").write_text("CT_TEST_TOKEN='it'\\''s secret'\n")
    stub = stub_python(tmp_path / "bin")
    env = {"PATH": os.environ["PATH"], "CLOUDTUNE_PYTHON": str(stub), "STUB_LOG": str(tmp_path / "calls"),
           "STUB_EXIT": "3"}
    subprocess.run(["sh", str(machine / "bundle" / "run.sh"), "--resume"], cwd=tmp_path, env=env, check=True)
    calls = (tmp_path / "calls").read_text()
    assert "args: -u -m cloudtune.remote.launch bundle/recipe.yaml --out out --resume" in calls
    assert "token: it's secret" in calls  # from the 0600 file, not from the command line
    launcher, parent = calls.split("launcher: ")[1].split()[0], calls.split("parent: ")[1].split()[0]
    assert launcher == parent  # with no launcher named, the trainer watches the script itself
    assert (machine / "train.log").read_text() == "trainer output\n"
    assert (machine / "exit_code").read_text().strip() == "3"


def test_skypilot_setup_checks_the_upload_and_installs_the_named_wheel(tmp_path):
    home = tmp_path / "home"
    upload = home / "cloudtune" / "upload"
    upload.mkdir(parents=True)
    bundle_src = tmp_path / "src" / "bundle"
    bundle_src.mkdir(parents=True)
    (bundle_src / "cloudtune-9.9-py3-none-any.whl").write_text("wheel")
    subprocess.run(["tar", "-czf", str(upload / "bundle.tar.gz"), "-C", str(bundle_src.parent), "bundle"], check=True)
    (upload / "requirements-train.txt").write_text("torch\n")
    sums = [f"{hashlib.sha256((upload / n).read_bytes()).hexdigest()}  {n}"
            for n in ("bundle.tar.gz", "requirements-train.txt")]
    (upload / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    bin_dir = tmp_path / "bin"
    stub_python(bin_dir)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(tmp_path / "calls"),
           "CLOUDTUNE_WHEEL": "cloudtune-9.9-py3-none-any.whl"}
    done = subprocess.run(["bash", "-c", script("skypilot_setup.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text()
    assert "--force-reinstall bundle/cloudtune-9.9-py3-none-any.whl" in calls
    assert "-r upload/requirements-train.txt" in calls

    (upload / "bundle.tar.gz").write_bytes(b"tampered")
    done = subprocess.run(["bash", "-c", script("skypilot_setup.sh")], env=env, capture_output=True, text=True)
    assert done.returncode != 0  # a corrupted upload stops the setup before anything is installed


def test_skypilot_run_resumes_only_from_a_complete_checkpoint(tmp_path):
    home = tmp_path / "home"
    (home / "cloudtune").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    stub_python(bin_dir)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(tmp_path / "calls"),
           "CLOUDTUNE_IMAGE": "img", "CLOUDTUNE_IMAGE_DIGEST": "img@sha256:0"}
    subprocess.run(["bash", "-c", script("skypilot_run.sh")], env=env, check=True, capture_output=True)
    assert (tmp_path / "calls").read_text().splitlines()[0].endswith("--out out")
    step = home / "cloudtune" / "out" / "checkpoints" / "step-4"
    step.mkdir(parents=True)  # half copied onto the bucket when the machine was taken away: no marker yet
    done = subprocess.run(["bash", "-c", script("skypilot_run.sh")], env=env, check=True, capture_output=True,
                          text=True)
    assert "resuming" not in done.stdout and (tmp_path / "calls").read_text().splitlines()[-3].endswith("--out out")
    (step / COMPLETE).write_text("complete\n")
    done = subprocess.run(["bash", "-c", script("skypilot_run.sh")], env=env, check=True, capture_output=True,
                          text=True)
    assert "resuming from the newest checkpoint" in done.stdout
    assert (tmp_path / "calls").read_text().splitlines()[-3].endswith("--out out --resume")


# ----------------------------------------------------------------------------------------------
# The run step as SkyPilot 0.14.1 runs it: its own wrapper around the script (its bash prologue, the
# MOUNT_CACHED upload wait appended after the last line), run with `bash -i` in a session of its own.

# A stand-in trainer in Python with the real launcher watchdog: it says when it started, answers
# SIGTERM as the trainer does (a checkpoint, exit 143), or exits $STUB_EXIT.
TRAINER = """#!{python}
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from cloudtune.remote.watchdog import watch_launcher
log = Path(os.environ["STUB_LOG"])
def stop(signum, frame):
    with log.open("a") as handle:
        handle.write("stopped by SIGTERM\\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
if os.environ.get("STUB_MODE") != "wait":
    print("trainer output", flush=True)
    sys.exit(int(os.environ.get("STUB_EXIT", "0")))
watch_launcher()
log.write_text(f"pid {{os.getpid()}}\\n")
while True:
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def sky_wrapper(tmp_path_factory) -> str:
    """SkyPilot's wrapper with RUN where the task's run script goes (made in a process of its own: sky
    reads HOME when imported, and this test's HOME is not the one sky must use elsewhere)."""
    home = tmp_path_factory.mktemp("sky-import-home")
    code = ("from sky.backends.task_codegen import TaskCodeGen\n"
            "from sky.skylet import log_lib\n"
            "print(log_lib.make_task_bash_script(TaskCodeGen.build_task_bash_script('RUN', env_prefix='unset X')))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HOME": str(home)}, check=True,
                          capture_output=True, text=True)
    assert "__skypilot_user_exit_code=$?" in done.stdout and "; RUN\n" in done.stdout
    return done.stdout


def sky_job(tmp_path: Path, wrapper: str, **env: str) -> tuple[list[str], dict[str, str], Path]:
    """The wrapped run step, a machine's HOME under a cached bucket mount that has finished uploading."""
    home = tmp_path / "home"
    (home / "cloudtune").mkdir(parents=True)
    (home / ".sky" / "rclone_log").mkdir(parents=True)
    (home / ".sky" / "rclone_log" / "out.log").write_text("INFO  : vfs cache: cleaned: objects 3 (was 3) in use 0, "
                                                         "to upload 0, uploading 0, total size 1k\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"python3": TRAINER.format(python=sys.executable, repo=str(REPO)),
             "findmnt": "#!/bin/sh\necho '/home/u/cloudtune/out ct-bucket fuse.rclone rw'\n",
             "sleep": "#!/bin/sh\nexit 0\n"}  # SkyPilot's upload wait polls every 10 s
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job = tmp_path / "sky_app_job"
    job.write_text(wrapper.replace("; RUN\n", "; " + script("skypilot_run.sh") + "\n"))
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(tmp_path / "calls"),
                "CLOUDTUNE_IMAGE": "img", "CLOUDTUNE_IMAGE_DIGEST": "img@sha256:0", **env}
    return ["/bin/bash", "-i", str(job)], full_env, tmp_path / "calls"


def test_skypilot_run_keeps_skypilots_upload_wait_and_the_trainers_exit_status(tmp_path, sky_wrapper):
    command, env, _ = sky_job(tmp_path, sky_wrapper, STUB_EXIT="3")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, start_new_session=True)
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # The bucket's last uploads are waited for after the trainer ended, not skipped by an `exec`.
    assert lines.index("trainer output") < next(i for i, line in enumerate(lines)
                                                 if "cached mount upload complete" in line)


def _started(calls: Path, job: subprocess.Popen) -> int:
    deadline = time.time() + 30
    while not (calls.exists() and calls.read_text().startswith("pid ")):
        assert job.poll() is None and time.time() < deadline, "the stand-in trainer did not start"
        time.sleep(0.1)
    return int(calls.read_text().split()[1])


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_sky_cancel_stops_the_trainer(tmp_path, sky_wrapper, how):
    """`sky cancel` SIGTERMs the job's shell (SkyPilot's job driver and its process-tree daemon): the
    trainer is stopped with a checkpoint and the shell waits for it; a shell killed outright leaves the
    trainer to its watchdog, which stops it within seconds."""
    command, env, calls = sky_job(tmp_path, sky_wrapper, STUB_MODE="wait")
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    trainer = _started(calls, job)
    job.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    output = job.communicate(timeout=30)[0]
    deadline = time.time() + 15
    while process_alive(trainer):
        assert time.time() < deadline, "the trainer outlived its cancelled job"
        time.sleep(0.1)
    assert "stopped by SIGTERM" in calls.read_text()
    if how == "sigterm":
        assert job.returncode == 143, output  # the trainer's own status, after SkyPilot's upload wait
        assert "cached mount upload complete" in output


def test_a_training_whose_launcher_is_gone_and_whose_step_does_not_end_is_killed_after_the_grace(tmp_path):
    """A step of thousands of micro-batches does not see the watchdog's SIGTERM for minutes: after the
    grace (here 1 s) the watchdog kills the training, so nothing runs on unwatched."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stuck = ("import signal, sys, time\n"
             f"sys.path.insert(0, {str(REPO)!r})\n"
             "from cloudtune.remote.watchdog import watch_launcher\n"
             "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM: stopping at the end of the step', flush=True))\n"
             "watch_launcher()\n"
             "time.sleep(60)\n")
    started = time.time()
    done = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=50,
                          env={**os.environ, "CLOUDTUNE_LAUNCHER_PID": gone.stdout.strip(),
                               "CLOUDTUNE_STOP_GRACE_S": "1"})
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert "is gone; stopping with a checkpoint" in done.stdout and "SIGTERM: stopping" in done.stdout
    assert "did not reach the end of its step within 1 s; killed" in done.stdout
    assert time.time() - started < 30
