"""The cloudtune wheel a remote machine installs: built from this checkout, cached by a hash of its sources.

Remote backends ship it inside the bundle, so the training machine runs exactly the code that planned
the run, needs no access to a package index for cloudtune itself, and never installs SkyPilot.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from .errors import CloudtuneError
from .paths import home

# What setuptools reads to build the wheel; the source hash covers exactly these.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "cloudtune", "tasks")
SKIPPED = ("__pycache__", ".pyc", ".egg-info")
# The core dependencies the training process imports; the rest (click, rich, paramiko, skypilot) are
# for the CLI on the user's machine and stay off the GPU box.
TRAINING_CORE = ("pydantic", "pyyaml")
TRAIN_EXTRA = re.compile(r"""\s*(?:and\s+)?extra\s*==\s*["']train["']\s*(?:and\s+)?""")


def project_root() -> Path | None:
    """The source checkout this cloudtune runs from, or None when it is installed from a wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "cloudtune" / "__init__.py").is_file() else None


def _source_files(root: Path) -> list[Path]:
    files = []
    for name in SOURCES:
        path = root / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [p for p in candidates if p.is_file() and not any(s in p.as_posix() for s in SKIPPED)]
    return files


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_wheel(cache: Path | None = None) -> Path:
    """The wheel of this checkout, built once per source hash (a rebuild takes a few seconds)."""
    root = project_root()
    if root is None:
        raise CloudtuneError(
            f"cannot build the cloudtune wheel for the remote machine: {Path(__file__).parent} is not in a "
            "source checkout (no pyproject.toml beside it).",
            "Install cloudtune from its git checkout (`pip install -e .`) to use remote backends.")
    target = (cache or home() / "wheels") / source_hash(root)
    built = sorted(target.glob("cloudtune-*.whl"))
    if built:
        return built[0]
    with tempfile.TemporaryDirectory(prefix="cloudtune-wheel-") as scratch:
        # Building in a copy keeps build/ and *.egg-info out of the user's checkout.
        source = Path(scratch) / "src"
        for path in _source_files(root):
            dest = source / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                   "--wheel-dir", str(Path(scratch) / "dist"), str(source)]
        if importlib.util.find_spec("setuptools") is not None:
            command.insert(4, "--no-build-isolation")  # no index needed when setuptools is already here
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted((Path(scratch) / "dist").glob("cloudtune-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise CloudtuneError(f"building the cloudtune wheel from {root} failed:\n{tail}",
                                 "Check that `pip wheel --no-deps .` works in that checkout.")
        staged = target.with_name(target.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        shutil.copy2(wheels[0], staged / wheels[0].name)
        try:
            staged.rename(target)  # atomic: a concurrent run sees a complete wheel or none
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)  # another run built the same sources first
    return sorted(target.glob("cloudtune-*.whl"))[0]


def train_requirements(wheel: Path) -> list[str]:
    """What the training machine needs besides cloudtune: the `[train]` extra plus the core it imports.

    Read from the wheel's own metadata, so the remote environment always matches the code shipped.
    """
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(name).decode())
    needed = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        requirement, marker = requirement.strip(), marker.strip()
        package = re.split(r"[\s\[<>=!~(]", requirement, maxsplit=1)[0].lower()
        if TRAIN_EXTRA.search(marker):
            rest = TRAIN_EXTRA.sub(" ", marker).strip()
            needed.append(f"{requirement}; {rest}" if rest else requirement)
        elif not marker and package in TRAINING_CORE:
            needed.append(requirement)
    return needed
