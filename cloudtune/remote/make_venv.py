"""Build a venv for one requirement set, once: a lock serialises concurrent runs, `.ready` marks success.

usage: python make_venv.py MARK VENV REQUIREMENTS_JSON
Prints MARK + the venv's python. System site-packages stay visible, so a torch that came with the
machine (or the image) is reused rather than downloaded again. The SSH backend runs it over its
connection, the SkyPilot backend ships it in the upload for clusters without an image (Slurm).
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

PIP = ["-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check"]


def venv_key(base: str, requirements):
    """The venv's folder name for a base Python (or image) and a requirement set: the same pair, the same venv."""
    return hashlib.sha256(json.dumps([base, sorted(requirements)]).encode()).hexdigest()[:16]


def build(venv, requirements):
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    with open(venv + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(venv, ".ready")):
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
            subprocess.run([os.path.join(venv, "bin", "python")] + PIP + requirements, check=True)
            open(os.path.join(venv, ".ready"), "w").close()
    return os.path.join(venv, "bin", "python")


if __name__ == "__main__":
    print(sys.argv[1] + build(sys.argv[2], json.loads(sys.argv[3])))
