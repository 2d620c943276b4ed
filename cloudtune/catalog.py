"""GPU offers (from SkyPilot's own catalog) and the specs of the GPUs people fine-tune on.

Offers come from `sky.catalog.list_accelerators`, so cloudtune and SkyPilot's optimizer read the same
prices. Offline, SkyPilot's catalog directory is seeded from the dated snapshot bundled in
`cloudtune/data/catalog/v8` (SkyPilot never re-downloads a catalog file that has no `.md5` beside
it). Importing sky costs seconds, so the flattened offers are cached in $CLOUDTUNE_HOME keyed by the
catalog files' size and mtime: a repeated `cloudtune cost` does not import sky at all.

GPU names differ between clouds (A10 vs A10G, A100-80GB vs A100-80GB-SXM, H100 vs H100-SXM...).
Every catalog row is mapped to one canonical name with a spec; a user's `--gpu` is matched by
`match_gpus`, where a family name (A10, A100, H100, V100) matches every member of the family.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CloudtuneError
from .paths import home
from .plan import Offer

SNAPSHOT_DIR = Path(__file__).parent / "data" / "catalog" / "v8"
CATALOG_VERSION = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in skypilot 0.14
SEED_RECORD = ".cloudtune-seed.json"
CACHE_FILE = "offers.json"

# Usable share of the nominal memory, as `torch.cuda.mem_get_info` reports it on a fresh device:
# datacenter GDDR cards reserve about 6 % for ECC (A10G: 23,028 of 24,576 MiB), HBM parts about 1 %
# (H100: 81,559 of 81,920 MiB), GeForce cards run without ECC.
ECC_GDDR, HBM, GEFORCE = 0.937, 0.99, 0.995


@dataclass(frozen=True)
class GpuSpec:
    name: str  # canonical, as cloudtune shows it
    family: str  # what a bare family name in --gpu matches (A10 -> A10, A10G)
    memory_gib: float  # nominal, per GPU
    tflops: float  # dense tensor TFLOP/s in the training dtype (bf16; fp16 where bf16 is missing)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    bf16: bool
    usable: float  # share of memory_gib that PyTorch can allocate
    source: str  # where the figures come from

    @property
    def usable_gib(self) -> float:
        return self.memory_gib * self.usable


# Dense (no 2:4 sparsity) tensor throughput with fp32 accumulation; datasheets quote the sparse
# figure first, so it is halved here. "≈" marks figures derived rather than printed by the vendor.
# Professional (non-GeForce) cards run fp16/bf16 with fp32 accumulation at the full fp16 rate, so an
# Ada datasheet's "AI TFLOPS" (FP8, sparse) is divided by 4 (RTX 6000 Ada: 1,457 -> 364, as the Ada
# whitepaper prints) and a Blackwell RTX PRO "AI TOPS" (FP4, sparse) by 8.
_SPECS = [
    GpuSpec("T4", "T4", 16, 65, 320, False, ECC_GDDR, "NVIDIA T4 datasheet: 65 TFLOPS FP16 mixed precision; no bf16"),
    GpuSpec("V100", "V100", 16, 125, 900, False, HBM, "NVIDIA V100 datasheet (SXM2): 125 TFLOPS FP16 tensor; no bf16"),
    GpuSpec("V100-32GB", "V100", 32, 125, 900, False, HBM, "NVIDIA V100 datasheet (SXM2 32GB)"),
    GpuSpec("RTX6000", "RTX6000", 24, 130.5, 672, False, ECC_GDDR,
            "NVIDIA Quadro RTX 6000 datasheet: 130.5 TFLOPS FP16 tensor (Turing); no bf16"),
    GpuSpec("L4", "L4", 24, 121, 300, True, ECC_GDDR, "NVIDIA L4 datasheet: 242 TFLOPS BF16 with sparsity"),
    GpuSpec("A10", "A10", 24, 125, 600, True, ECC_GDDR, "NVIDIA A10 datasheet: 125 TFLOPS BF16 (250 sparse)"),
    GpuSpec("A10G", "A10", 24, 70, 600, True, ECC_GDDR,
            "AWS's A10 variant (g5); ≈70 TFLOPS BF16 tensor as compared by Baseten, NVIDIA publishes no sheet"),
    GpuSpec("A40", "A40", 48, 149.7, 696, True, ECC_GDDR, "NVIDIA A40 datasheet: 299.4 TFLOPS BF16 with sparsity"),
    GpuSpec("A6000", "A6000", 48, 154.8, 768, True, ECC_GDDR,
            "NVIDIA RTX A6000 datasheet: 309.7 TFLOPS tensor, sparse"),
    GpuSpec("L40", "L40", 48, 181, 864, True, ECC_GDDR, "NVIDIA L40 datasheet: 362 TFLOPS BF16 with sparsity"),
    GpuSpec("L40S", "L40S", 48, 362, 864, True, ECC_GDDR, "NVIDIA L40S datasheet: 733 TFLOPS BF16 with sparsity"),
    GpuSpec("RTX6000-Ada", "RTX6000-Ada", 48, 364, 960, True, ECC_GDDR,
            "NVIDIA RTX 6000 Ada datasheet / Ada whitepaper: 728.5 TFLOPS FP16 tensor, sparse"),
    GpuSpec("RTXPRO6000", "RTXPRO6000", 96, 500, 1792, True, ECC_GDDR,
            "NVIDIA RTX PRO 6000 Blackwell: ≈ 4 PFLOPS FP4 sparse / 8 (derived)"),
    GpuSpec("RTX3060", "RTX3060", 12, 25.6, 360, True, GEFORCE, "NVIDIA Ampere GA10x whitepaper: BF16 w/ FP32 acc."),
    GpuSpec("RTX3070", "RTX3070", 8, 40.6, 448, True, GEFORCE, "NVIDIA Ampere GA10x whitepaper: BF16 w/ FP32 acc."),
    GpuSpec("RTX3080", "RTX3080", 10, 59.5, 760, True, GEFORCE, "NVIDIA Ampere GA10x whitepaper: BF16 w/ FP32 acc."),
    GpuSpec("RTX3090", "RTX3090", 24, 71, 936, True, GEFORCE,
            "NVIDIA Ampere GA102 whitepaper: 71 TFLOPS BF16 w/ FP32 acc."),
    GpuSpec("RTX4060", "RTX4060", 8, 30, 272, True, GEFORCE, "NVIDIA Ada whitepaper class figure (≈)"),
    GpuSpec("RTX4070", "RTX4070", 12, 58, 504, True, GEFORCE, "NVIDIA Ada whitepaper class figure (≈)"),
    GpuSpec("RTX4090", "RTX4090", 24, 165.2, 1008, True, GEFORCE,
            "NVIDIA Ada whitepaper: 165.2 TFLOPS BF16 w/ FP32 acc. (330.4 sparse)"),
    GpuSpec("RTX5090", "RTX5090", 32, 209.5, 1792, True, GEFORCE, "NVIDIA Blackwell GeForce whitepaper (≈)"),
    GpuSpec("RTXA2000", "RTXA2000", 12, 32, 288, True, ECC_GDDR,
            "NVIDIA RTX A2000 datasheet: 63.9 TFLOPS tensor, sparse"),
    GpuSpec("RTXA4000", "RTXA4000", 16, 76.7, 448, True, ECC_GDDR,
            "NVIDIA RTX A4000 datasheet: 153.4 TFLOPS tensor, sparse; 16 GB, 448 GB/s"),
    GpuSpec("RTXA5000", "RTXA5000", 24, 111.1, 768, True, ECC_GDDR,
            "NVIDIA RTX A5000 datasheet: 222.2 TFLOPS tensor, sparse; 24 GB, 768 GB/s"),
    GpuSpec("RTX2000-Ada", "RTX2000-Ada", 16, 48, 224, True, ECC_GDDR,
            "NVIDIA RTX 2000 Ada datasheet: 191.9 TFLOPS tensor (FP8, sparse) / 4 (≈, derived); 16 GB, 224 GB/s"),
    GpuSpec("RTXPRO5000", "RTXPRO5000", 48, 258, 1344, True, ECC_GDDR,
            "NVIDIA RTX PRO 5000 Blackwell: ≈ 2,064 AI TOPS (FP4 sparse) / 8 (derived); 48 GB, 1,344 GB/s"),
    GpuSpec("A100", "A100", 40, 312, 1555, True, HBM, "NVIDIA A100 datasheet: 312 TFLOPS BF16 (40GB, 1,555 GB/s)"),
    GpuSpec("A100-80GB", "A100", 80, 312, 2039, True, HBM,
            "NVIDIA A100 datasheet: 312 TFLOPS BF16 (80GB SXM, 2,039 GB/s)"),
    GpuSpec("H100", "H100", 80, 989, 3350, True, HBM, "NVIDIA H100 datasheet (SXM): 1,979 TFLOPS BF16 with sparsity"),
    GpuSpec("H100-PCIE", "H100", 80, 756, 2000, True, HBM, "NVIDIA H100 datasheet (PCIe): 1,513 TFLOPS BF16, sparse"),
    GpuSpec("H100-NVL", "H100", 94, 835, 3900, True, HBM, "NVIDIA H100 datasheet (NVL): 1,671 TFLOPS BF16, sparse"),
    GpuSpec("GH200", "GH200", 96, 989, 4000, True, HBM, "NVIDIA GH200 datasheet: H100 tensor cores, 96GB HBM3"),
    GpuSpec("H200", "H200", 141, 989, 4800, True, HBM, "NVIDIA H200 datasheet (SXM): 1,979 TFLOPS BF16, sparse"),
    GpuSpec("B200", "B200", 180, 2250, 7700, True, HBM, "NVIDIA HGX B200: 4.5 PFLOPS FP16/BF16 per GPU, sparse"),
    GpuSpec("B300", "B300", 288, 2250, 8000, True, HBM, "NVIDIA HGX B300 (≈ B200 BF16 rate; 288GB HBM3e)"),
    GpuSpec("MI300X", "MI300X", 192, 1307.4, 5300, True, HBM,
            "AMD Instinct MI300X datasheet: 1,307.4 TFLOPS BF16 dense"),
]
SPECS: dict[str, GpuSpec] = {spec.name: spec for spec in _SPECS}

# Catalog GPUs that are never planned on, and why (shown by `cloudtune gpus`).
UNSUPPORTED = {
    "K80": "no tensor cores (2014)", "M60": "no tensor cores", "P4": "no tensor cores", "P100": "no tensor cores",
    "T4G": "AWS Graviton (arm64) host; the training image is x86-64", "MI25": "no supported PyTorch build",
}

_VENDOR_WORDS = re.compile(r"\b(NVIDIA|GEFORCE|TESLA|QUADRO|AMD|RADEON|INSTINCT)\b")
# Spellings seen in catalogs and in what users type, squashed (upper case, letters and digits only).
_ALIASES = {
    "A10040GB": "A100", "A100SXM": "A100", "A100SXM4": "A100", "A100PCIE": "A100", "A100SXM440GB": "A100",
    "A10080GBSXM": "A100-80GB", "A10080GBPCIE": "A100-80GB", "A100SXM80GB": "A100-80GB", "A100SXM480GB": "A100-80GB",
    "A100PCIE80GB": "A100-80GB",
    "H100SXM": "H100", "H100SXM5": "H100", "H10080GB": "H100", "H100NVLINK": "H100", "H100NVLINK80GB": "H100",
    "H100MEGA": "H100", "H100HBM3": "H100", "H10080GBHBM3": "H100", "H100SXM80GB": "H100",
    "H100PCIE80GB": "H100-PCIE", "H200SXM": "H200", "H200141GB": "H200",
    "RTXA6000": "A6000", "6000ADA": "RTX6000-Ada", "RTX6000ADAGENERATION": "RTX6000-Ada",
    "RTXPRO6000S": "RTXPRO6000", "RTXPRO6000BLACKWELL": "RTXPRO6000", "RTXPRO6000SE": "RTXPRO6000",
    "V10016GB": "V100", "V100SXM2": "V100", "V100SXM216GB": "V100", "V100SXM232GB": "V100-32GB",
    "A2000": "RTXA2000", "A4000": "RTXA4000", "A5000": "RTXA5000",
    "2000ADA": "RTX2000-Ada", "RTX2000ADAGENERATION": "RTX2000-Ada", "RTXPRO5000BLACKWELL": "RTXPRO5000",
    # The Workstation Edition: the same GB202 (188 SMs), 96 GB and 1,792 GB/s as the Server Edition, 4,000 AI TOPS.
    "RTXPRO6000WK": "RTXPRO6000", "RTXPRO6000WS": "RTXPRO6000", "RTXPRO6000BLACKWELLWORKSTATIONEDITION": "RTXPRO6000",
}
_FAMILY_NOTES = {
    "A10": "A10 also matches A10G, AWS's variant of it (same 24 GB, lower tensor throughput); "
           "ask for A10G for AWS only, or pass --cloud to narrow.",
    "A100": "A100 matches the 40 GB and the 80 GB cards; ask for A100-40GB or A100-80GB for one of them.",
    "H100": "H100 matches the SXM, PCIe and NVL cards; ask for H100-SXM, H100-PCIE or H100-NVL for one of them.",
    "V100": "V100 matches the 16 GB and the 32 GB cards; ask for V100-32GB for the larger one.",
}


def _squash(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", _VENDOR_WORDS.sub("", name.upper()))


_CANONICAL = {_squash(name): name for name in SPECS}


def canonical_gpu(name: str, instance_type: str = "") -> str | None:
    """The canonical spec name for a catalog or user spelling; None when cloudtune has no spec for it."""
    key = _squash(name)
    if re.fullmatch(r"\d{4}", key):  # "4090" -> RTX4090
        key = "RTX" + key
    found = _CANONICAL.get(key) or _ALIASES.get(key)
    if found == "H100":  # Lambda and Vast name the PCIe and NVL cards H100 too; the instance tells
        instance = instance_type.upper()
        if "PCIE" in instance:
            return "H100-PCIE"
        if re.search(r"NVL(?!INK)", instance):
            return "H100-NVL"
        if re.fullmatch(r"\d+X_H100_SECURE", instance):  # RunPod's plain H100 is the PCIe card (its SXM is H100-SXM)
            return "H100-PCIE"
    return found


def usable_gib(offer: Offer) -> float:
    """Memory PyTorch can allocate on one of the offer's GPUs.

    Some catalogs list the nominal size (24,576 MiB for an A10G), others what the driver reports
    (45,000 MiB for an L40S): the usable share applies to the nominal size, never below the row's.
    """
    spec = SPECS[offer.gpu]
    nominal = max(offer.gpu_memory_gib, spec.memory_gib)
    return min(offer.gpu_memory_gib, nominal * spec.usable)


def unsupported_reason(name: str) -> str | None:
    key = _squash(name)
    return next((why for gpu, why in UNSUPPORTED.items() if key == gpu or key.endswith(gpu)), None)


@dataclass(frozen=True)
class GpuMatch:
    names: frozenset[str]
    note: str | None = None


def match_gpus(query: str) -> GpuMatch:
    """Which canonical GPUs a user's `--gpu` means. A family name matches its whole family."""
    name = canonical_gpu(query)
    if name is None:
        reason = unsupported_reason(query)
        if reason:
            raise CloudtuneError(f"--gpu {query}: cloudtune does not train on this GPU ({reason}).",
                                 "`cloudtune gpus` lists the GPUs with offers.")
        known = sorted(SPECS)
        guess = difflib.get_close_matches(query.upper(), known, n=3, cutoff=0.5)
        hint = f"Did you mean {' or '.join(guess)}? " if guess else ""
        raise CloudtuneError(f"--gpu {query}: no GPU of that name.",
                             f"{hint}Known GPUs: {', '.join(known)}.")
    spec = SPECS[name]
    if _squash(query) == _squash(spec.family) and spec.family in _FAMILY_NOTES:
        members = frozenset(s.name for s in _SPECS if s.family == spec.family)
        return GpuMatch(members, _FAMILY_NOTES[spec.family])
    return GpuMatch(frozenset({name}))


# ----------------------------------------------------------------------------------------------
# SkyPilot's catalog directory, seeded from the bundled snapshot


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
    record = _read_json(record_path) or {}
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
        _write_json(record_path, record)
    return target


def _catalog_origin(relative: str, path: Path, record: dict) -> dict[str, str]:
    """Where one catalog file's prices come from, and of when."""
    seeded = record.get(relative)
    if seeded and path.exists() and _sha256(path) == seeded["sha256"]:
        return {"origin": "bundled snapshot", "date": seeded["snapshot_date"]}
    return {"origin": "SkyPilot catalog", "date": time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))}


# ----------------------------------------------------------------------------------------------
# Offers


@dataclass
class Catalog:
    offers: list[Offer]
    snapshot_date: str  # oldest date among the clouds read
    sources: dict[str, dict[str, str]]  # cloud -> {"origin": "bundled snapshot" | "SkyPilot catalog", "date"}
    problems: list[str] = field(default_factory=list)  # clouds SkyPilot could not read
    skipped: dict[str, str] = field(default_factory=dict)  # catalog GPU name -> why it is never planned on
    from_cache: bool = False

    def as_dict(self) -> dict:
        return {"snapshot_date": self.snapshot_date, "sources": self.sources, "problems": self.problems,
                "skipped": self.skipped, "from_cache": self.from_cache, "offers": [asdict(o) for o in self.offers]}

    def describe(self) -> str:
        return describe_sources(self.sources, self.snapshot_date)


def load_offers(clouds: Sequence[str] | None = None, region: str | None = None) -> Catalog:
    """Every GPU offer of the given clouds (default: all bundled ones), cheapest region per instance type.

    Reads through SkyPilot's catalog API the first time; afterwards from the cache until a catalog
    file changes.
    """
    wanted = _check_clouds(clouds)
    seed_sky_catalog()
    key = _cache_key(region)
    cache_path = home() / "cache" / CACHE_FILE
    cached = _read_json(cache_path)
    if cached and cached.get("key") == key:
        catalog = Catalog(offers=[Offer(**row) for row in cached["offers"]], snapshot_date=cached["snapshot_date"],
                          sources=cached["sources"], problems=cached["problems"], skipped=cached["skipped"],
                          from_cache=True)
    else:
        catalog = _read_skypilot(bundled_clouds(), region)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(cache_path, {"key": key, **catalog.as_dict()})
    return _only_clouds(catalog, wanted)


def _check_clouds(clouds: Sequence[str] | None) -> list[str]:
    available = bundled_clouds()
    if not clouds:
        return available
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
    return f"prices: SkyPilot catalog fetched {fetched}; others bundled snapshot of {snapshot_date()}"


def _cache_key(region: str | None) -> str:
    """Changes whenever a catalog file, the bundled snapshot or this module changes."""
    target = sky_catalog_dir()
    parts = [CATALOG_VERSION, str(region), str(Path(__file__).stat().st_mtime_ns)]
    for cloud in bundled_clouds():
        path = target / cloud / "vms.csv"
        stat = path.stat() if path.exists() else None
        parts.append(f"{cloud}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{cloud}:-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _read_skypilot(clouds: list[str], region: str | None) -> Catalog:
    import sky.catalog as sky_catalog  # heavy (seconds): only on a cache miss

    target = sky_catalog_dir()
    record = _read_json(target / SEED_RECORD) or {}
    offers: list[Offer] = []
    sources: dict[str, str] = {}
    problems: list[str] = []
    skipped: dict[str, str] = {}
    for cloud in clouds:
        try:  # one cloud at a time, so one unreadable file cannot hide the others' offers
            found = sky_catalog.list_accelerators(gpus_only=True, clouds=cloud, all_regions=False,
                                                  region_filter=re.escape(region) if region else None)
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises anything from pandas to requests
            problems.append(f"{cloud}: SkyPilot could not read its catalog ({type(exc).__name__}: {exc})")
            continue
        sources[cloud] = _catalog_origin(f"{cloud}/vms.csv", target / cloud / "vms.csv", record)
        for accelerator, infos in found.items():
            for info in infos:
                offer = _offer(cloud, accelerator, info)
                if isinstance(offer, str):
                    skipped[accelerator] = offer
                elif offer is not None:
                    offers.append(offer)
    offers.sort(key=lambda o: (o.price_per_hour, o.cloud, o.instance_type))
    return Catalog(offers=offers, snapshot_date=_oldest(sources) or snapshot_date(), sources=sources,
                   problems=problems, skipped=skipped)


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


# ----------------------------------------------------------------------------------------------
# Refresh


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
    seed_sky_catalog()
    if not network_available(probe_host):
        return [RefreshResult(cloud, False, "no network") for cloud in wanted]
    from sky.catalog import common as sky_common  # heavy

    target = sky_catalog_dir()
    record_path = target / SEED_RECORD
    results = []
    for cloud in wanted:
        path = target / cloud / "vms.csv"
        backup = path.with_name("vms.csv.cloudtune-backup")
        if path.exists():
            os.replace(path, backup)
        try:
            # A missing file is what makes SkyPilot download it (and write the .md5 that marks it as
            # its own, so from then on SkyPilot refreshes it by itself).
            frame = sky_common.read_catalog(f"{cloud}/vms.csv", pull_frequency_hours=0)
            rows = len(frame.index)
        except Exception as exc:  # noqa: BLE001
            if backup.exists():
                os.replace(backup, path)
            results.append(RefreshResult(cloud, False, f"{type(exc).__name__}: {exc}"))
            continue
        backup.unlink(missing_ok=True)
        record = _read_json(record_path) or {}
        record.pop(f"{cloud}/vms.csv", None)
        _write_json(record_path, record)
        results.append(RefreshResult(cloud, True, f"{rows} rows"))
    return results


# ----------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data) -> None:
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data))
    os.replace(scratch, path)
