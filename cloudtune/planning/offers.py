"""GPU offers: one cloud's instance type in a region at its catalog price, read through SkyPilot's catalog.

Offers come from `sky.catalog.list_accelerators` (planning/sky_catalog.py), so cloudtune and SkyPilot's
optimizer read the same prices: SkyPilot's own catalog files where it has them, the bundled snapshot
otherwise. Importing sky costs seconds, so the flattened offers, and what SkyPilot cannot do on each
cloud, are cached in $CLOUDTUNE_HOME keyed by the catalog files' size and mtime: a repeated
`cloudtune cost` does not import sky at all.
"""
from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CloudtuneError
from ..paths import home
from ..recipe import OWN_CLUSTERS
from . import gpus, sky_catalog
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
    """Every GPU offer of the given clouds (default: all bundled ones), cheapest region per instance type.

    Reads through SkyPilot's catalog API the first time; afterwards from the cache until a catalog
    file changes.
    """
    wanted = _check_clouds(clouds)
    own = [cloud for cloud in wanted if cloud in OWN_CLUSTERS]
    # a cluster of one's own has no catalog: without a cloud that has one, sky is not even imported
    catalog = _read_catalogs(region) if len(own) < len(wanted) else \
        Catalog(offers=[], snapshot_date="your own cluster", sources={})
    catalog = _only_clouds(catalog, [cloud for cloud in wanted if cloud not in own])
    catalog.offers += own_cluster_offers(own, region)
    catalog.own_clusters = own
    return catalog


def _read_catalogs(region: str | None) -> Catalog:
    key = _cache_key(region)
    cache_path = home() / "cache" / CACHE_FILE
    cached = read_json(cache_path)
    if cached and cached.get("key") == key:
        return Catalog(offers=[Offer(**row) for row in cached["offers"]], snapshot_date=cached["snapshot_date"],
                       sources=cached["sources"], problems=cached["problems"], skipped=cached["skipped"],
                       unsupported=cached["unsupported"], from_cache=True)
    catalog = _read_skypilot(sky_catalog.bundled_clouds(), region)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache_path, {"key": key, **catalog.as_dict()})
    return catalog


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


def _only_clouds(catalog: Catalog, clouds: list[str]) -> Catalog:
    keep = set(clouds)
    catalog.offers = [o for o in catalog.offers if o.cloud in keep]
    catalog.sources = {c: s for c, s in catalog.sources.items() if c in keep}
    catalog.unsupported = {c: u for c, u in catalog.unsupported.items() if c in keep}
    catalog.snapshot_date = _oldest(catalog.sources) or catalog.snapshot_date
    return catalog


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


def _cache_key(region: str | None) -> str:
    """Changes whenever a catalog file, the bundled snapshot or the code that reads rows into offers changes."""
    target = sky_catalog.sky_catalog_dir()
    parts = [sky_catalog.CATALOG_VERSION, str(region), sky_catalog.snapshot_date()]
    parts += [str(Path(module).stat().st_mtime_ns) for module in (__file__, gpus.__file__, sky_catalog.__file__)]
    for cloud in sky_catalog.bundled_clouds():
        path = target / cloud / "vms.csv"
        stat = path.stat() if path.exists() else None
        parts.append(f"{cloud}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{cloud}:-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _read_skypilot(clouds: list[str], region: str | None) -> Catalog:
    offers: list[Offer] = []
    sources: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    skipped: dict[str, str] = {}
    unsupported: dict[str, dict[str, dict[str, str]]] = {}
    for cloud in clouds:
        try:  # one cloud at a time, so one unreadable file cannot hide the others' offers
            found = sky_catalog.list_gpu_rows(cloud, region)
            unsupported[cloud] = sky_catalog.unsupported_features(cloud)
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises anything from pandas to requests
            problems.append(f"{cloud}: SkyPilot could not read its catalog ({type(exc).__name__}: {exc})")
            continue
        sources[cloud] = sky_catalog.catalog_origin(cloud)
        for accelerator, infos in found.items():
            for info in infos:
                offer = _offer(cloud, accelerator, info)
                if isinstance(offer, str):
                    skipped[accelerator] = offer
                elif offer is not None:
                    offers.append(offer)
    offers.sort(key=lambda o: (o.price_per_hour, o.cloud, o.instance_type))
    return Catalog(offers=offers, snapshot_date=_oldest(sources) or sky_catalog.snapshot_date(), sources=sources,
                   problems=problems, skipped=skipped, unsupported=unsupported)


def _offer(cloud: str, accelerator: str, info) -> Offer | str | None:
    """One catalog row as an Offer; a string says why the GPU is skipped; None drops a broken row."""
    name = canonical_gpu(accelerator, info.instance_type or "")
    if name is None:
        return unsupported_reason(accelerator) or "no spec in cloudtune's GPU table"
    count = info.accelerator_count
    if not count or count != int(count) or _missing(info.price) or info.price <= 0:
        return None  # fractional GPUs and rows without a price cannot be planned on
    # Marketplaces fill SpotPrice with 0 or the on-demand price when they have no spot market.
    spot = None if _missing(info.spot_price) or not 0 < info.spot_price < info.price else float(info.spot_price)
    # The row's own memory is more specific (a 4060 Ti has 8 or 16 GB) unless it is broken: RunPod
    # writes GB where MiB belong (80 -> 0.08 GiB here), Vast the total over all the GPUs.
    memory, nominal = info.device_memory, SPECS[name].memory_gib
    if not _missing(memory) and count > 1 and memory > nominal * 1.25:
        memory = memory / count
    if _missing(memory) or memory < 4:
        memory = nominal
    return Offer(cloud=cloud, region=str(info.region), instance_type=str(info.instance_type), gpu=name,
                 gpu_count=int(count), gpu_memory_gib=round(float(memory), 1),
                 price_per_hour=round(float(info.price), 4), spot_price_per_hour=spot, accelerator=accelerator)


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
