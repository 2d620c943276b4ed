"""Checksummed output manifests: the training side writes one, every backend verifies what it pulls.

An adapter that arrives corrupted is worse than none: the user deletes the machine believing it safe.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import CloudtuneError

MANIFEST = "manifest.json"
# Checkpoints stay on the machine: they exist for resuming there, and can be many GB.
NOT_PULLED = ("checkpoints",)
# Trackers' own folders go on being written after training ends (W&B's service appends to its debug
# logs while it shuts down), and so does the trainer's debug.log (train/redacted_output.py) until its
# process ends, so no checksum taken at the end can hold for them. They are the user's data (an offline
# W&B run is what `wandb sync` uploads later), so they are still pulled and installed, listed as
# unverified instead of being left on a machine that is about to be deleted.
LIVE_DIRS = ("wandb", "debug.log")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out: Path) -> dict[str, str]:
    """Checksums of every file complete now: the outputs minus checkpoints and live tracker folders."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and rel != MANIFEST and rel.split("/")[0] not in NOT_PULLED + LIVE_DIRS:
            files[rel] = sha256_file(path)
    live = [name for name in LIVE_DIRS if (out / name).exists()]
    (out / MANIFEST).write_text(json.dumps({"files": files, "unverified": live}, indent=1))
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


def check_destination(dest: Path) -> None:
    """Nothing the user has is overwritten: dest must be absent or an empty directory."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CloudtuneError(f"{dest} already exists and is not empty; refusing to overwrite it.",
                             "Choose another outputs.dir or move the old outputs away.")


def install(fetch: Callable[[Path], None], dest: Path) -> dict[str, str]:
    """All or nothing: `fetch` fills a new folder beside dest; once every checksum holds, one rename
    makes it dest. A failure anywhere (a full disk, a bad file) leaves no dest and no partial files,
    so the same install can simply be tried again."""
    staging = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"  # same filesystem: rename is atomic
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(staging)  # a backend's pull creates staging itself (the contract: copy out/ to there)
        files = read_manifest(staging / MANIFEST)
        verify(staging, files)
        check_destination(dest)
        _drop_unlisted(staging, files)
        staging.rename(dest)  # onto an empty dest directory, or none
    except OSError as exc:
        raise CloudtuneError(f"writing the outputs to {dest.parent} failed: {exc.strerror or exc}.",
                             "Nothing was installed; free space there (or fix the permissions), then pull again."
                             ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def _drop_unlisted(staging: Path, files: dict[str, str]) -> None:
    """Only what the manifest vouches for (and the live tracker folders) is installed."""
    keep = {*files, MANIFEST}
    for path in sorted(staging.rglob("*"), reverse=True):
        rel = path.relative_to(staging).as_posix()
        if rel.split("/")[0] in LIVE_DIRS or rel in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()
