"""The cloudtune wheel a remote machine installs: built from this checkout (or rebuilt from an installed
wheel's files), cached by a hash of its contents.

Remote backends ship it inside the bundle, so the training machine runs exactly the code that planned
the run, needs no access to a package index for cloudtune itself, and never installs SkyPilot.
"""
from __future__ import annotations

import base64
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
INSTALLER_FILES = ("INSTALLER", "REQUESTED", "direct_url.json")  # written by pip at install, not in the wheel
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
    """The wheel of the cloudtune that runs here, built once per content hash (a rebuild takes seconds).

    From a source checkout: built from its sources. From an installed wheel (`pip install cloudtune`):
    put back together from the installed files its RECORD lists, so the machine gets the very code
    that planned the run either way.
    """
    root = project_root()
    if root is not None:
        key = source_hash(root)
        def make(scratch: Path) -> Path:
            return _wheel_from_sources(root, scratch)
    else:
        installed = installed_files()
        key = "installed-" + _files_hash(installed)
        def make(scratch: Path) -> Path:
            return _wheel_from_installed(installed, scratch)
    target = (cache or home() / "wheels") / key
    built = sorted(target.glob("cloudtune-*.whl"))
    if built:
        return built[0]
    with tempfile.TemporaryDirectory(prefix="cloudtune-wheel-") as scratch:
        _keep(make(Path(scratch)), target)
    return sorted(target.glob("cloudtune-*.whl"))[0]


def _keep(wheel: Path, target: Path) -> None:
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    shutil.copy2(wheel, staged / wheel.name)
    try:
        staged.rename(target)  # atomic: a concurrent run sees a complete wheel or none
    except OSError:
        shutil.rmtree(staged, ignore_errors=True)  # another run built the same sources first


def _wheel_from_sources(root: Path, scratch: Path) -> Path:
    # Building in a copy keeps build/ and *.egg-info out of the user's checkout.
    source = scratch / "src"
    for path in _source_files(root):
        dest = source / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--wheel-dir", str(scratch / "dist"), str(source)]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")  # no index needed when setuptools is already here
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted((scratch / "dist").glob("cloudtune-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise CloudtuneError(f"building the cloudtune wheel from {root} failed:\n{tail}",
                             "Check that `pip wheel --no-deps .` works in that checkout.")
    return wheels[0]


def installed_files() -> dict[str, Path]:
    """The installed cloudtune's own files (path inside a wheel -> file), from its RECORD.

    What the installer added (INSTALLER, REQUESTED, direct_url.json, console scripts, bytecode) is
    left out, as it was not in the wheel.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("cloudtune")
    except metadata.PackageNotFoundError:
        dist = None
    listed = (dist.files or []) if dist is not None else []
    info = next((f.parts[0] for f in listed if f.parts[0].endswith(".dist-info")), None)
    files = {f.as_posix(): Path(f.locate()) for f in listed
             if f.parts[0] in ("cloudtune", info) and f.name not in INSTALLER_FILES
             and not any(s in f.as_posix() for s in SKIPPED)}
    missing = sorted(name for name, path in files.items() if not path.is_file())
    if info is None or "cloudtune/__init__.py" not in files or missing:
        where = Path(__file__).parent
        raise CloudtuneError(f"cannot rebuild the cloudtune wheel for the remote machine: the installation at "
                             f"{where} is incomplete ({', '.join(missing[:5]) or 'no RECORD of its files'}).",
                             "Reinstall cloudtune (`pip install --force-reinstall cloudtune`), or run it from its "
                             "git checkout (`pip install -e .`).")
    return files


def _files_hash(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _wheel_from_installed(files: dict[str, Path], scratch: Path) -> Path:
    """A wheel of exactly these files, with a fresh RECORD (the same bytes give the same wheel)."""
    info = next(name.split("/")[0] for name in files if name.split("/")[0].endswith(".dist-info"))
    tags = [line.split(":", 1)[1].strip() for line in files[f"{info}/WHEEL"].read_text().splitlines()
            if line.startswith("Tag:")]
    wheel = scratch / f"{info.removesuffix('.dist-info')}-{tags[0] if tags else 'py3-none-any'}.whl"
    record = f"{info}/RECORD"
    rows = []
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(n for n in files if n != record):
            payload = files[name].read_bytes()
            archive.writestr(_entry(name), payload)
            digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(payload)}")
        rows.append(f"{record},,")
        archive.writestr(_entry(record), "\n".join(rows) + "\n")
    return wheel


def _entry(name: str) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    entry.external_attr = 0o644 << 16  # rw-r--r--, as the files were installed
    return entry


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
