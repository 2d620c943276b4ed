"""The GPUs cloudtune plans on: their specs, and the one canonical name for each of their spellings.

GPU names differ between clouds (A10 vs A10G, A100-80GB vs A100-80GB-SXM, H100 vs H100-SXM...).
Every catalog row is mapped to one canonical name with a spec; a user's `--gpu` is matched by
`match_gpus`, where a family name (A10, A100, H100, V100) matches every member of the family.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CloudtuneError

if TYPE_CHECKING:
    from .offers import Offer

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

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores (compute capability 8.9 and up): what `method: fp8` needs."""
        return self.name in FP8_GPUS


# Ada (8.9), Hopper (9.0) and Blackwell (10.x, 12.x): the GPUs whose tensor cores multiply float8
FP8_GPUS = frozenset({"L4", "L40", "L40S", "RTX6000-Ada", "RTX2000-Ada", "RTX4060", "RTX4070", "RTX4090",
                      "H100", "H100-PCIE", "H100-NVL", "GH200", "H200", "B200", "B300", "RTX5090",
                      "RTXPRO6000", "RTXPRO5000"})

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


def split_gpu_count(text: str, field: str = "--gpu") -> tuple[str, int | None]:
    """SkyPilot's `NAME:COUNT` (A10:1, H100:8) as (name, count); a bare name has no count."""
    name, colon, count = text.strip().partition(":")
    if not colon:
        return name, None
    if not count.isdigit() or int(count) < 1:
        raise CloudtuneError(f"{field} {text}: the count after ':' must be a whole number of GPUs, 1 or more.",
                             f"Write {field} {name or 'A10'}:1, or leave the count out.")
    return name, int(count)
