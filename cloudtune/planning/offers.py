"""GPU offers: one cloud's instance type in a region at its catalog price, read through SkyPilot's catalog.

Offers come from `sky.catalog.list_accelerators` (planning/sky_catalog.py), so cloudtune and SkyPilot's
optimizer read the same prices: SkyPilot's own catalog files where it has them, the bundled snapshot
otherwise. Importing sky costs seconds, so its rows of every region, and what SkyPilot cannot do on
each cloud, are kept per cloud: for the snapshot in a file shipped beside it (a fresh install never
imports sky to price), for SkyPilot's own files in $CLOUDTUNE_HOME keyed by their size and mtime.
Region filters and the cheapest region per instance type are applied to those rows, so one cache
serves every recipe, with or without `compute.region`.
"""
from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..clouds import OWN_CLUSTERS
from ..errors import CloudtuneError
from ..paths import home
from . import sky_catalog
from .gpus import SPECS, canonical_gpu, unsupported_reason
from .jsonfile import read_json, write_json

CACHE_FILE = "offers.json"


@dataclass(frozen=True)
class Offer:
    """One way to rent GPUs: a cloud's instance type in a region, at its catalog price."""

    cloud: str
    region: str
    instance_type: str
    gpu: str  # normalised name, e.g. "A10G", "A100-80GB", "H100"
    gpu_count: int
    gpu_memory_gib: float  # per GPU
    price_per_hour: float  # on-demand, whole instance
    spot_price_per_hour: float | None = None
    accelerator: str = ""  # the catalog's own name for the GPU (what SkyPilot's `accelerators:` takes)

    @property
    def sky_accelerator(self) -> str:
        return self.accelerator or self.gpu


@dataclass
class Catalog:
    offers: list[Offer]
    snapshot_date: str  # oldest date among the clouds read
    sources: dict[str, dict[str, str]]  # cloud -> {"origin": "bundled snapshot" | "SkyPilot catalog", "date"}
    problems: list[str] = field(default_factory=list)  # clouds SkyPilot could not read
    skipped: dict[str, str] = field(default_factory=dict)  # catalog GPU name -> why it is never planned on
    # cloud -> "on-demand" | "spot" -> SkyPilot feature (sky_catalog.FEATURES) it lacks there -> SkyPilot's reason
    unsupported: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    from_cache: bool = False
    own_clusters: list[str] = field(default_factory=list)  # clouds of the user's own machines (slurm), at $0

    def as_dict(self) -> dict:
        return {"snapshot_date": self.snapshot_date, "sources": self.sources, "problems": self.problems,
                "skipped": self.skipped, "unsupported": self.unsupported, "from_cache": self.from_cache,
                "offers": [asdict(o) for o in self.offers]}

    def describe(self) -> str:
        own = [f"{cloud}: your own cluster, $0" for cloud in self.own_clusters]
        return "; ".join(([describe_sources(self.sources, self.snapshot_date)] if self.sources else []) + own)


def load_offers(clouds: Sequence[str] | None = None, region: str | None = None) -> Catalog:
    """Every GPU offer of the given clouds (default: all bundled ones), cheapest region per instance type
    (among the regions whose name contains `region`, as SkyPilot's region filter reads it)."""
    wanted = _check_clouds(clouds)
    own = [cloud for cloud in wanted if cloud in OWN_CLUSTERS]
    priced = [cloud for cloud in wanted if cloud not in own]
    # a cluster of one's own has no catalog: without a cloud that has one, nothing is read
    catalog = _catalog_of(_read_rows(priced), region) if priced else \
        Catalog(offers=[], snapshot_date="your own cluster", sources={})
    catalog.offers += own_cluster_offers(own, region)
    catalog.own_clusters = own
    return catalog


def _catalog_of(read: dict[str, dict], region: str | None) -> Catalog:
    offers: list[Offer] = []
    skipped: dict[str, str] = {}
    for cloud, entry in read.items():
        for row in _cheapest_region(entry.get("rows", []), region):
            offer = _offer(cloud, row)
            if isinstance(offer, str):
                skipped[row[0]] = offer
            elif offer is not None:
                offers.append(offer)
    offers.sort(key=lambda o: (o.price_per_hour, o.cloud, o.instance_type))
    sources = {cloud: entry["source"] for cloud, entry in read.items() if "source" in entry}
    return Catalog(offers=offers, snapshot_date=_oldest(sources) or sky_catalog.snapshot_date(), sources=sources,
                   problems=[entry["problem"] for entry in read.values() if "problem" in entry], skipped=skipped,
                   unsupported={cloud: entry["unsupported"] for cloud, entry in read.items() if "unsupported" in entry},
                   from_cache=not any(entry.get("read_now") for entry in read.values()))


def _cheapest_region(rows: list[list], region: str | None) -> list[list]:
    """What `sky.catalog.list_accelerators(all_regions=False, region_filter=...)` returns, from the rows of
    every region: per instance type the cheapest region (ties: the first region by name)."""
    best: dict[tuple, list] = {}
    for row in rows:
        if region and region not in str(row[ROW.index("region")]):
            continue
        key = tuple(row[ROW.index(name)] for name in ("accelerator", "instance_type", "count", "vcpus", "memory"))
        if key not in best or _price_order(row) < _price_order(best[key]):
            best[key] = row
    return list(best.values())


def _price_order(row: list) -> tuple:
    spot = row[ROW.index("spot_price")]
    return (row[ROW.index("price")], _missing(spot), spot if not _missing(spot) else 0.0, row[ROW.index("region")])


def _read_rows(clouds: list[str]) -> dict[str, dict]:
    """cloud -> {"rows", "unsupported", "source"} or {"problem"}: from the offers bundled for the price
    snapshot where SkyPilot has no file of its own, else from the cache, else read through SkyPilot now
    (seconds: `import sky`) and cached, one entry per cloud, so a changed file costs only its own cloud."""
    cache_path = home() / "cache" / CACHE_FILE
    cached = read_json(cache_path) or {}
    entries = cached.get("clouds", {}) if cached.get("code") == _code_key() else {}
    bundle = _bundle()
    read: dict[str, dict] = {}
    missing: list[str] = []
    for cloud in clouds:
        key = _file_key(cloud)
        if key is None and bundle is not None and cloud in bundle["clouds"]:
            read[cloud] = {**bundle["clouds"][cloud], "source": sky_catalog.catalog_origin(cloud)}
        elif entries.get(cloud, {}).get("key") == (key or _bundled_key(cloud)):
            read[cloud] = {**entries[cloud], "source": sky_catalog.catalog_origin(cloud)}
        else:
            missing.append(cloud)
    if missing:
        for cloud, entry in read_through_skypilot(missing).items():
            if "problem" in entry:
                read[cloud] = {**entry, "read_now": True}
                continue
            read[cloud] = {**entry, "source": sky_catalog.catalog_origin(cloud), "read_now": True}
            entries[cloud] = {**entry, "key": _file_key(cloud) or _bundled_key(cloud)}
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, {"code": _code_key(), "clouds": entries})
    return {cloud: read[cloud] for cloud in clouds}


# One catalog row as cached and bundled: SkyPilot's InstanceTypeInfo fields, every region.
ROW = ("accelerator", "instance_type", "count", "vcpus", "device_memory", "memory", "price", "spot_price", "region")


def read_through_skypilot(clouds: list[str]) -> dict[str, dict]:
    """SkyPilot's catalog rows of each cloud (every region) and what SkyPilot cannot do there."""
    read: dict[str, dict] = {}
    for cloud in clouds:
        try:  # one cloud at a time, so one unreadable file cannot hide the others' offers
            found = sky_catalog.list_gpu_rows(cloud)
            unsupported = sky_catalog.unsupported_features(cloud)
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises anything from pandas to requests
            read[cloud] = {"problem": f"{cloud}: SkyPilot could not read its catalog ({type(exc).__name__}: {exc})"}
            continue
        rows = [[accelerator, info.instance_type, info.accelerator_count, info.cpu_count, info.device_memory,
                 info.memory, info.price, info.spot_price, info.region]
                for accelerator, infos in sorted(found.items()) for info in infos]
        read[cloud] = {"rows": [[None if _missing(v) else v for v in row] for row in rows],
                       "unsupported": unsupported}
    return read


BUNDLE = sky_catalog.SNAPSHOT_DIR.parent / "offers.json"


def write_bundle() -> Path:
    """The snapshot's rows as SkyPilot reads them, shipped beside it so a fresh install prices without
    importing sky; run after the snapshot or the SkyPilot pin changes (scripts/build_offers_bundle.py)."""
    clouds = sky_catalog.bundled_clouds()
    read = read_through_skypilot(clouds)
    problems = [entry["problem"] for entry in read.values() if "problem" in entry]
    if problems:
        raise CloudtuneError("; ".join(problems))
    write_json(BUNDLE, {"skypilot": sky_catalog.skypilot_version(), "files": _snapshot_hashes(clouds),
                        "clouds": read})
    return BUNDLE


def _bundle() -> dict | None:
    """The bundled rows, when they are of this snapshot and this SkyPilot (else SkyPilot reads it)."""
    bundle = read_json(BUNDLE)
    if not bundle or bundle.get("skypilot") != sky_catalog.skypilot_version():
        return None
    if bundle.get("files") != _snapshot_hashes(sky_catalog.bundled_clouds()):
        return None
    return bundle


def _snapshot_hashes(clouds: list[str]) -> dict[str, str]:
    return {cloud: hashlib.sha256((sky_catalog.SNAPSHOT_DIR / cloud / "vms.csv").read_bytes()).hexdigest()
            for cloud in clouds}


def _file_key(cloud: str) -> str | None:
    """SkyPilot's own catalog file of the cloud, by size and mtime; None where it has none."""
    path = sky_catalog.sky_catalog_dir() / cloud / "vms.csv"
    stat = path.stat() if path.is_file() else None
    return f"sky:{stat.st_size}:{stat.st_mtime_ns}" if stat else None


def _bundled_key(cloud: str) -> str:
    return f"snapshot:{_snapshot_hashes([cloud])[cloud]}"


def _code_key() -> str:
    """Changes with the SkyPilot release or the code that reads rows out of it."""
    parts = [sky_catalog.CATALOG_VERSION, sky_catalog.skypilot_version()]
    parts += [str(Path(module).stat().st_mtime_ns) for module in (__file__, sky_catalog.__file__)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def own_cluster_offers(clouds: Sequence[str], region: str | None) -> list[Offer]:
    """A cluster the user has (Slurm) has no catalog and costs nothing more to use: one $0 offer per GPU
    cloudtune knows and count, so the plan still says how long the run takes on each; which of them the
    cluster really has is SkyPilot's to find at launch."""
    return [Offer(cloud=cloud, region=region or "", instance_type="", gpu=spec.name, gpu_count=count,
                  gpu_memory_gib=spec.memory_gib, price_per_hour=0.0, accelerator=spec.name)
            for cloud in clouds for spec in SPECS.values() for count in (1, 2, 4, 8)]


def _check_clouds(clouds: Sequence[str] | None) -> list[str]:
    available = sky_catalog.bundled_clouds()
    if not clouds:
        return available
    available = available + list(OWN_CLUSTERS)
    wanted = [c.lower() for c in clouds]
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise CloudtuneError(f"unknown cloud {', '.join(map(repr, unknown))}.",
                             f"Clouds with prices: {', '.join(available)}.")
    return wanted


def _oldest(sources: dict[str, dict[str, str]]) -> str | None:
    return min((s["date"] for s in sources.values()), default=None)


def describe_sources(sources: dict[str, dict[str, str]], date: str) -> str:
    """'prices: bundled snapshot of 2026-11-23' or, mixed, which clouds were refreshed when."""
    live = {cloud: s["date"] for cloud, s in sources.items() if s["origin"] != "bundled snapshot"}
    if not live:
        return f"prices: bundled SkyPilot catalog snapshot of {date}"
    fetched = ", ".join(f"{cloud} {day}" for cloud, day in sorted(live.items()))
    if len(live) == len(sources):
        return f"prices: SkyPilot catalog fetched {fetched}"
    return f"prices: SkyPilot catalog fetched {fetched}; others bundled snapshot of {sky_catalog.snapshot_date()}"


def _offer(cloud: str, row: list) -> Offer | str | None:
    """One catalog row as an Offer; a string says why the GPU is skipped; None drops a broken row."""
    accelerator, instance_type, count, _vcpus, memory, _host_memory, price, spot_price, region = row
    name = canonical_gpu(accelerator, instance_type or "")
    if name is None:
        return unsupported_reason(accelerator) or "no spec in cloudtune's GPU table"
    if not count or count != int(count) or _missing(price) or price <= 0:
        return None  # fractional GPUs and rows without a price cannot be planned on
    # Marketplaces fill SpotPrice with 0 or the on-demand price when they have no spot market.
    spot = None if _missing(spot_price) or not 0 < spot_price < price else float(spot_price)
    # The row's own memory is more specific (a 4060 Ti has 8 or 16 GB) unless it is broken: RunPod
    # writes GB where MiB belong (80 -> 0.08 GiB here), Vast the total over all the GPUs.
    nominal = SPECS[name].memory_gib
    if not _missing(memory) and count > 1 and memory > nominal * 1.25:
        memory = memory / count
    if _missing(memory) or memory < 4:
        memory = nominal
    return Offer(cloud=cloud, region=str(region), instance_type=str(instance_type), gpu=name,
                 gpu_count=int(count), gpu_memory_gib=round(float(memory), 1),
                 price_per_hour=round(float(price), 4), spot_price_per_hour=spot, accelerator=accelerator)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class RefreshResult:
    cloud: str
    ok: bool
    message: str


def network_available(host: str = "raw.githubusercontent.com", timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def refresh_catalogs(clouds: Sequence[str] | None = None, probe_host: str = "raw.githubusercontent.com"
                     ) -> list[RefreshResult]:
    """Ask SkyPilot to download fresh catalogs; keep the current file wherever that fails.

    `probe_host` is where SkyPilot's catalogs are hosted; when it cannot be reached nothing is touched.
    """
    wanted = _check_clouds(clouds)
    wanted = [cloud for cloud in wanted if cloud not in OWN_CLUSTERS]  # they have no catalog
    if not network_available(probe_host):
        return [RefreshResult(cloud, False, "no network") for cloud in wanted]
    results = []
    for cloud in wanted:
        try:
            what = sky_catalog.redownload(cloud)
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises anything from pandas to requests
            results.append(RefreshResult(cloud, False, f"{type(exc).__name__}: {exc}"))
            continue
        results.append(RefreshResult(cloud, not what.startswith("kept"), what))
    return results


@dataclass
class GpuOffers:
    """`cloudtune gpus`: the offers asked for, what a refresh did, and a note on how the name matched."""

    catalog: Catalog
    refreshed: list[RefreshResult]
    note: str | None = None


def gpu_offers(gpu: str | None = None, clouds: Sequence[str] | None = None, refresh: bool = False, *,
               count: int | None = None, spot: bool = False) -> GpuOffers:
    """The offers `cloudtune gpus` lists: of one GPU (family), of `count` GPUs, with a spot price (then
    cheapest spot price first)."""
    from .gpus import match_gpus

    refreshed = refresh_catalogs(clouds) if refresh else []
    catalog = load_offers(clouds)
    match = match_gpus(gpu) if gpu else None
    catalog.offers = [offer for offer in catalog.offers
                      if (match is None or offer.gpu in match.names) and count in (None, offer.gpu_count)
                      and (not spot or offer.spot_price_per_hour is not None)]
    if spot:
        catalog.offers.sort(key=lambda o: (o.spot_price_per_hour, o.cloud, o.instance_type))
    return GpuOffers(catalog, refreshed, match.note if match else None)
