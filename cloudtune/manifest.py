"""Checksummed output manifests: the training side writes one, every backend verifies what it pulls.

An adapter that arrives corrupted is worse than none: the user deletes the machine believing it safe.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .errors import CloudtuneError

MANIFEST = "manifest.json"
# Checkpoints stay on the machine: they exist for resuming there, and can be many GB.
NOT_PULLED = ("checkpoints",)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out: Path) -> dict[str, str]:
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and rel != MANIFEST and rel.split("/")[0] not in NOT_PULLED:
            files[rel] = sha256_file(path)
    (out / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    return files


def read_manifest(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CloudtuneError(f"{path}: the output manifest is missing or unreadable ({exc}).",
                             "The training did not finish writing its outputs; check `cloudtune logs`.") from None


def verify(root: Path, files: dict[str, str]) -> None:
    bad = [rel for rel, digest in files.items()
           if not (root / rel).is_file() or sha256_file(root / rel) != digest]
    if bad:
        raise CloudtuneError(f"checksum mismatch for {len(bad)} pulled file(s): {', '.join(bad[:5])}.",
                             "Nothing was moved into your output directory; pull again.")


def install(staging: Path, files: dict[str, str], dest: Path) -> None:
    """Move verified files from staging into dest without overwriting anything the user has."""
    verify(staging, files)
    if dest.exists() and any(dest.iterdir()):
        raise CloudtuneError(f"{dest} already exists and is not empty; refusing to overwrite it.",
                             "Choose another outputs.dir or move the old outputs away.")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / rel), target)
    shutil.copy2(staging / MANIFEST, dest / MANIFEST)
