"""The cloudtune wheel a remote machine installs, from a source checkout and from a pip-installed cloudtune.

A user who ran `pip install cloudtune` has no checkout: the installed copy must still ship itself,
and a dry run must fail (or pass) exactly where the real run would, before anything is rented.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cloudtune.wheel import build_wheel, train_requirements

from .conftest import REPO

# Run by the installed copy: where it lives, whether it sees a checkout, the wheel it ships.
SHIP = """
import json, cloudtune, cloudtune.wheel as w
print(json.dumps({"module": cloudtune.__file__, "root": str(w.project_root()), "wheel": str(w.build_wheel())}))
"""


def pip_install(wheel: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)


def installed_env(site: Path, home: Path) -> dict[str, str]:
    """A process that imports cloudtune from `site` only (not this checkout), its dependencies from the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SKY_RUNTIME_DIR")}
    return {**env, "PYTHONPATH": str(site), "CLOUDTUNE_HOME": str(home / "ct"), "HOME": str(home),
            "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """cloudtune installed from a wheel of this checkout into a folder of its own, and that wheel."""
    folder = tmp_path_factory.mktemp("installed")
    wheel = build_wheel(folder / "cache")
    pip_install(wheel, folder / "site")
    return folder, wheel


def _contents(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/RECORD")}


def test_a_pip_installed_cloudtune_ships_itself(installed):
    folder, original = installed
    shown = subprocess.run([sys.executable, "-c", SHIP], cwd=folder, env=installed_env(folder / "site", folder),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert found["module"].startswith(str(folder / "site")) and found["root"] == "None"
    rebuilt = Path(found["wheel"])
    assert rebuilt.name == original.name and rebuilt.is_relative_to(folder / "ct" / "wheels")
    assert _contents(rebuilt) == _contents(original)  # the same files, byte for byte
    assert train_requirements(rebuilt) == train_requirements(original)

    # The rebuilt wheel installs and runs: its RECORD matches, its package data (the scripts) is there.
    pip_install(rebuilt, folder / "again")
    check = ("from cloudtune.backends.skypilot import script; "
             "print(script('skypilot_run.sh').count('cloudtune.remote.launch'))")
    done = subprocess.run([sys.executable, "-c", check], cwd=folder, env=installed_env(folder / "again", folder),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and int(done.stdout) >= 1, done.stderr


def test_a_dry_run_from_the_installed_copy_builds_the_bundle_it_would_ship(installed):
    folder, original = installed
    env = {**installed_env(folder / "site", folder), "HF_TOKEN": "hf_" + "x" * 30}  # the recipe's secret, checked
    recipe = str(REPO / "tasks" / "llama2-7b-qlora-guanaco.yaml")
    done = subprocess.run([sys.executable, "-m", "cloudtune.cli", "run", "--backend", "skypilot", "--dry-run",
                           "--gpu", "A10", "--json", recipe], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout[done.stdout.index("{"):])
    assert f"bundle/{original.name}" in shown["bundle"]["files"] and "bundle/recipe.yaml" in shown["bundle"]["files"]
    assert list((folder / "ct" / "wheels").glob(f"installed-*/{original.name}"))
    assert not list((folder / "ct").glob("runs/*")), "a dry run keeps nothing"


def test_an_installation_without_its_files_says_what_to_do(installed, tmp_path):
    folder, original = installed
    site = tmp_path / "site"
    pip_install(original, site)
    (site / "cloudtune" / "tiny.py").unlink()
    done = subprocess.run([sys.executable, "-c", SHIP], cwd=tmp_path, env=installed_env(site, tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "installation at" in done.stderr and "cloudtune/tiny.py" in done.stderr and "--force-reinstall" in \
        done.stderr
