"""SkyPilot's price catalogs, read through SkyPilot's own code and never written to.

This is the only module in cloudtune.planning that imports sky, always inside a function: importing
it costs seconds, and a cached `cloudtune cost` must not pay them.

SkyPilot keeps its catalogs in ~/.sky/catalogs/v8 and refreshes each file whose `.md5` beside it
says it is its own download. That folder is SkyPilot's state: cloudtune only reads it. To price
offline, this process's SkyPilot reads a *view*, a folder of links in $CLOUDTUNE_HOME: SkyPilot's
own file wherever it has one, the dated snapshot bundled in `cloudtune/data/catalog/v8` otherwise.
The launch itself happens in SkyPilot's API server, which reads and fetches its own catalogs.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path

from ..paths import home
from .jsonfile import read_json

SNAPSHOT_DIR = Path(__file__).parent.parent / "data" / "catalog" / "v8"
CATALOG_VERSION = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in skypilot 0.14
# What cloudtune 0.1 wrote into SkyPilot's folder (md5-less copies of the snapshot, which SkyPilot
# then never refreshed) and the record of those copies; removed again by `undo_old_seed`.
OLD_SEED_RECORD = ".cloudtune-seed.json"
# The SkyPilot features a plan needs, by the names of sky.clouds.CloudImplementationFeatures.
FEATURES = ("DOCKER_IMAGE", "AUTODOWN", "SPOT_INSTANCE", "STORAGE_MOUNTING", "MULTI_NODE")

_view_in_use = False


def sky_catalog_dir() -> Path:
    """Where SkyPilot 0.14 keeps its catalogs: $SKY_RUNTIME_DIR (default ~) /.sky/catalogs/v8."""
    root = Path(os.path.expanduser(os.environ.get("SKY_RUNTIME_DIR") or "~"))
    return root / ".sky" / "catalogs" / CATALOG_VERSION


def view_dir() -> Path:
    return home() / "cache" / "sky-catalog" / CATALOG_VERSION


def bundled_clouds() -> list[str]:
    return sorted(p.name for p in SNAPSHOT_DIR.iterdir() if (p / "vms.csv").is_file())


def snapshot_date() -> str:
    """The date the bundled snapshot was read (the first ISO date in its SNAPSHOT.md)."""
    path = SNAPSHOT_DIR.parent / "SNAPSHOT.md"
    found = re.search(r"\b(20\d\d-\d\d-\d\d)\b", path.read_text()) if path.is_file() else None
    return found.group(1) if found else "unknown date"


def catalog_origin(cloud: str) -> dict[str, str]:
    """Where one cloud's prices come from, and of when: SkyPilot's own file, else the snapshot."""
    path = sky_catalog_dir() / cloud / "vms.csv"
    if path.is_file():
        return {"origin": "SkyPilot catalog", "date": time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))}
    return {"origin": "bundled snapshot", "date": snapshot_date()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def undo_old_seed() -> None:
    """Remove the snapshot copies an older cloudtune put into SkyPilot's folder, where still untouched,
    so SkyPilot fetches its full catalogs again. Files anyone changed since are left alone."""
    folder = sky_catalog_dir()
    record_path = folder / OLD_SEED_RECORD
    record = read_json(record_path)
    if record is None:
        return
    for relative, seeded in record.items():
        path = folder / relative
        if path.is_file() and isinstance(seeded, dict) and _sha256(path) == seeded.get("sha256"):
            path.unlink()
    record_path.unlink(missing_ok=True)


def _view_sources() -> dict[str, Path]:
    """Catalog file (relative path) -> the file the view links to."""
    sources = {p.relative_to(SNAPSHOT_DIR).as_posix(): p for p in SNAPSHOT_DIR.glob("*/*.csv")}
    own = sky_catalog_dir()
    if own.is_dir():
        sources |= {p.relative_to(own).as_posix(): p for p in own.glob("*/*.csv") if p.parent.name != ".meta"}
    return sources


def build_view() -> Path:
    """The folder of links SkyPilot reads here, brought up to date (links replaced atomically, so a
    concurrent cloudtune reads either link whole)."""
    view = view_dir()
    sources = _view_sources()
    for relative, source in sources.items():
        link = view / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == str(source):
            continue
        scratch = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        scratch.unlink(missing_ok=True)
        scratch.symlink_to(source)
        os.replace(scratch, link)
    for link in view.glob("*/*.csv"):
        if link.relative_to(view).as_posix() not in sources:
            link.unlink(missing_ok=True)
    return view


def use_catalog_view() -> None:
    """Point this process's SkyPilot catalog reads at the view, before sky reads any cloud's catalog.

    SkyPilot 0.14 takes its catalog folder from `sky.catalog.common._ABSOLUTE_VERSIONED_CATALOG_DIR`
    each time a cloud's catalog module is first loaded; the view has no `.md5` files, so SkyPilot
    never tries to download into it either.
    """
    global _view_in_use
    if _view_in_use:
        return
    undo_old_seed()
    view = build_view()
    from sky.catalog import common  # heavy (seconds): only on a cache miss

    old, common._ABSOLUTE_VERSIONED_CATALOG_DIR = common._ABSOLUTE_VERSIONED_CATALOG_DIR, str(view)
    # What `import sky` already opened (the accelerator names, in sky.utils.accelerator_registry)
    # points at the old folder: opened again, it reads the view too.
    for name, module in list(sys.modules.items()):
        if not name.startswith("sky.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, common.LazyDataFrame) and value._filename.startswith(old + os.sep):
                setattr(module, attr, common.read_catalog(os.path.relpath(value._filename, old)))
    _view_in_use = True


def list_gpu_rows(cloud: str) -> dict[str, list]:
    """SkyPilot's catalog rows of one cloud's GPU instances in every region, by accelerator name."""
    use_catalog_view()
    import sky.catalog as sky_catalog

    return sky_catalog.list_accelerators(gpus_only=True, clouds=cloud, all_regions=True)


def skypilot_version() -> str:
    """The installed SkyPilot's version, read from its metadata: importing sky to ask would cost seconds."""
    from importlib import metadata

    try:
        return metadata.version("skypilot")
    except metadata.PackageNotFoundError:
        return "not installed"


def unsupported_features(cloud: str) -> dict[str, dict[str, str]]:
    """What SkyPilot cannot do on one cloud, of what a plan needs: {"on-demand"|"spot": {feature: reason}}.

    Asked of the cloud's own class (`_unsupported_features_for_resources`, which its public
    `check_features_are_supported` reads), so the answer is the one SkyPilot's optimizer will give.
    """
    use_catalog_view()
    from sky import resources as resources_lib
    from sky.utils import registry

    cloud_class = type(registry.CLOUD_REGISTRY.from_str(cloud))
    table = {}
    for kind, spot in (("on-demand", False), ("spot", True)):
        unsupported = cloud_class._unsupported_features_for_resources(
            resources_lib.Resources(infra=cloud, use_spot=spot))
        table[kind] = {feature.name: str(reason) for feature, reason in unsupported.items()
                       if feature.name in FEATURES}
    return table


def redownload(cloud: str) -> str:
    """Have SkyPilot refresh one cloud's catalog in its own folder, as it does on its own; what it did.

    A file SkyPilot holds without its `.md5` counts as edited by hand there, and SkyPilot keeps it.
    """
    use_catalog_view()
    from sky.catalog import common as sky_common

    filename = f"{cloud}/vms.csv"
    path = sky_catalog_dir() / filename
    view, sky_common._ABSOLUTE_VERSIONED_CATALOG_DIR = sky_common._ABSOLUTE_VERSIONED_CATALOG_DIR, \
        str(sky_catalog_dir())
    try:
        if path.is_file() and sky_common.is_catalog_modified(filename):
            return "kept: SkyPilot's file has no .md5, so it counts as edited by hand and is never replaced"
        frame = sky_common.read_catalog(filename, pull_frequency_hours=0)
        return f"{len(frame.index)} rows"
    finally:
        sky_common._ABSOLUTE_VERSIONED_CATALOG_DIR = view
