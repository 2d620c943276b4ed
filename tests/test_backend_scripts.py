"""The programs the machines run (backends/scripts/), run here with stand-ins for python and pip.

The SSH backend's own programs are tested in test_ssh_scripts.py; these are the bundle's run.sh
(local and SSH backends) and SkyPilot's setup and run steps.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from cloudtune.backends.skypilot import script

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
    assert "args: -u -m cloudtune.train bundle/recipe.yaml --out out --resume" in calls
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


def test_skypilot_run_resumes_when_a_checkpoint_is_there(tmp_path):
    home = tmp_path / "home"
    (home / "cloudtune").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    stub_python(bin_dir)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(tmp_path / "calls"),
           "CLOUDTUNE_IMAGE": "img", "CLOUDTUNE_IMAGE_DIGEST": "img@sha256:0"}
    subprocess.run(["bash", "-c", script("skypilot_run.sh")], env=env, check=True, capture_output=True)
    assert (tmp_path / "calls").read_text().splitlines()[0].endswith("--out out")
    (home / "cloudtune" / "out" / "checkpoints" / "step-4").mkdir(parents=True)
    done = subprocess.run(["bash", "-c", script("skypilot_run.sh")], env=env, check=True, capture_output=True,
                          text=True)
    assert "resuming from the newest checkpoint" in done.stdout
    assert (tmp_path / "calls").read_text().splitlines()[-3].endswith("--out out --resume")
