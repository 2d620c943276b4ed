"""SkyPilot's own catalog files: seeded offline from the bundled snapshot, read and re-downloaded through sky.

This is the only module in cloudtune.planning that imports sky, always inside a function: importing
it costs seconds, and a cached `cloudtune cost` must not pay them.

Offline, SkyPilot's catalog directory is seeded from the dated snapshot bundled in
`cloudtune/data/catalog/v8` (SkyPilot never re-downloads a catalog file that has no `.md5` beside
it). Which seeded files are still the bundled ones is kept in a record beside them, so a price can
say whether it is the snapshot's or SkyPilot's own.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from .jsonfile import read_json, write_json

SNAPSHOT_DIR = Path(__file__).parent.parent / "data" / "catalog" / "v8"
CATALOG_VERSION = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in skypilot 0.14
SEED_RECORD = ".cloudtune-seed.json"


def sky_catalog_dir() -> Path:
    """Where SkyPilot 0.14 reads catalogs: $SKY_RUNTIME_DIR (default ~) /.sky/catalogs/v8."""
    root = Path(os.path.expanduser(os.environ.get("SKY_RUNTIME_DIR") or "~"))
    return root / ".sky" / "catalogs" / CATALOG_VERSION


def bundled_clouds() -> list[str]:
    return sorted(p.name for p in SNAPSHOT_DIR.iterdir() if (p / "vms.csv").is_file())


def snapshot_date() -> str:
    """The date the bundled snapshot was read (the first ISO date in its SNAPSHOT.md)."""
    path = SNAPSHOT_DIR.parent / "SNAPSHOT.md"
    found = re.search(r"\b(20\d\d-\d\d-\d\d)\b", path.read_text()) if path.is_file() else None
    return found.group(1) if found else "unknown date"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_sky_catalog() -> Path:
    """Copy each bundled catalog file SkyPilot does not have yet into its catalog directory, and
    replace an earlier seeded copy, untouched since, when this cloudtune bundles a newer snapshot.

    Other files already there (SkyPilot's own downloads, a user's edits) are left alone. A seeded
    file has no `.md5` in `.meta/`, which SkyPilot reads as "modified locally": it never tries to
    download that file again, so nothing here waits on the network.
    """
    target = sky_catalog_dir()
    record_path = target / SEED_RECORD
    record = read_json(record_path) or {}
    changed = False
    for source in sorted(SNAPSHOT_DIR.glob("*/*.csv")):
        relative = source.relative_to(SNAPSHOT_DIR).as_posix()
        dest = target / relative
        if dest.exists():
            seeded = record.get(relative)
            bundled = _sha256(source)
            if not seeded or seeded["sha256"] == bundled or _sha256(dest) != seeded["sha256"]:
                continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        scratch = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, scratch)
        os.replace(scratch, dest)  # atomic: a concurrent reader sees all of it or nothing
        record[relative] = {"sha256": _sha256(dest), "snapshot_date": snapshot_date()}
        changed = True
    if changed:
        write_json(record_path, record)
    return target


def catalog_origin(cloud: str, record: dict) -> dict[str, str]:
    """Where one cloud's catalog prices come from, and of when; `record` as `seed_record` returns it."""
    relative = f"{cloud}/vms.csv"
    path = sky_catalog_dir() / relative
    seeded = record.get(relative)
    if seeded and path.exists() and _sha256(path) == seeded["sha256"]:
        return {"origin": "bundled snapshot", "date": seeded["snapshot_date"]}
    return {"origin": "SkyPilot catalog", "date": time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))}


def seed_record() -> dict:
    """Relative catalog path -> {"sha256", "snapshot_date"} of each file seeded from the snapshot."""
    return read_json(sky_catalog_dir() / SEED_RECORD) or {}


def list_gpu_rows(cloud: str, region: str | None) -> dict[str, list]:
    """SkyPilot's catalog rows of one cloud's GPU instances, by accelerator name (cheapest region only)."""
    import sky.catalog as sky_catalog  # heavy (seconds): only on a cache miss

    return sky_catalog.list_accelerators(gpus_only=True, clouds=cloud, all_regions=False,
                                         region_filter=re.escape(region) if region else None)


def redownload(cloud: str) -> int:
    """Have SkyPilot download one cloud's catalog afresh; the number of rows it got.

    The current file is restored when that fails, and the exception passes on.
    """
    from sky.catalog import common as sky_common  # heavy

    path = sky_catalog_dir() / cloud / "vms.csv"
    backup = path.with_name("vms.csv.cloudtune-backup")
    if path.exists():
        os.replace(path, backup)
    try:
        # A missing file is what makes SkyPilot download it (and write the .md5 that marks it as
        # its own, so from then on SkyPilot refreshes it by itself).
        frame = sky_common.read_catalog(f"{cloud}/vms.csv", pull_frequency_hours=0)
    except Exception:
        if backup.exists():
            os.replace(backup, path)
        raise
    backup.unlink(missing_ok=True)
    return len(frame.index)


def forget_seed(cloud: str) -> None:
    """One cloud's catalog is SkyPilot's own from now on, not the bundled snapshot's."""
    record_path = sky_catalog_dir() / SEED_RECORD
    record = read_json(record_path) or {}
    record.pop(f"{cloud}/vms.csv", None)
    write_json(record_path, record)
