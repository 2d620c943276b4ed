"""What a fine-tune costs on each GPU offer: memory fit, training time, overheads, dollars per run.

Time = tokens the GPU processes / throughput + fixed overheads. Throughput comes from FLOPs: about
2·N per token forward, 2·N more for the backward of a frozen base (LoRA, QLoRA, 8-bit) or 4·N for
full fine-tuning, 2·N more when checkpointing recomputes the forward, plus attention. The GPU's
datasheet bf16 peak times an efficiency turns FLOPs into seconds; LoRA's small kernels around each
adapted layer add bytes over the GPU's memory bandwidth; and every micro-batch costs a fixed number
of tokens' worth of time on top, growing with the kernels it launches (adapted layers add theirs),
so small micro-batches run slower. Efficiency and the per-micro-batch cost are calibrated on
measured runs, listed in cloudtune/data/calibration.jsonl (one JSON object a line: stack, gpu,
model, method, gradient_checkpointing, width = padded row width, attention_span = keys a token
attends to on average (width / 2 when absent), micro_batch_tokens, lora_targets, tokens_per_s =
processed tokens incl. padding). Rows measured with cloudtune's own trainer (stack "cloudtune", written by
bench/cost_accuracy.py) take precedence over rows of other stacks for the same method and
checkpointing. 4-bit and 8-bit have their own factors: quantised weights are dequantised on every
pass.

Every figure is a low–high range: throughput from the spread of the calibration rows, overheads
from per-cloud provisioning times and download bandwidths, and tokens ±15 % when they were counted
without the model's tokenizer.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .datasets import DatasetReport, percentiles
from .errors import CloudtuneError
from .plan import Estimate, Plan
from .planning.gpus import SPECS, match_gpus, usable_gib
from .planning.memory import (
    ALL_LINEAR,
    CUDA_CONTEXT_BYTES,
    GIB,
    MemoryPeak,
    ModelShape,
    TrainSetup,
    checkpointing_note,
    lora_params,
    memory_peak,
    required_bytes,
)
from .planning.models import KNOWN_MODELS, ModelInfo, resolve_model
from .planning.offers import Offer, load_offers
from .recipe import Recipe

CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.jsonl"
MIN_SPREAD = 0.12  # no efficiency band is narrower than ±12 %: runs of one recipe vary that much
MAX_SPREAD = 1.35  # nor wider than ×/÷ 1.35 around the median: one odd row should not double a price
# Efficiency relative to cloudtune's bf16 LoRA, for a calibration without runs of the method: 4-bit
# dequantises every weight on each pass; bitsandbytes' LLM.int8 matmul with outlier decomposition
# trains 2-3x slower; full fine-tuning adds an optimizer step over every weight. The bundled
# calibration has runs of each (H100, 2026-11-23: 4-bit 0.76-0.95, 8-bit 0.43-0.50, full 0.47-0.50
# of LoRA's median efficiency), so this only serves calibrations that lack them.
RELATIVE_TO_16BIT = {"4bit": (0.76, 0.95), "8bit": (0.43, 0.5), "full": (0.47, 0.5)}
PACKING_FILL = 0.97  # first-fit-decreasing packing leaves about 3 % of each row empty
TOKENS_UNCERTAINTY = 0.15  # token counts estimated from characters (no tokenizer offline)
# A step cannot beat its kernel launches: tiny models are launch-bound, not FLOP-bound.
STEP_FLOOR_SECONDS = 5e-3
LAYER_PASS_SECONDS = 0.25e-3  # about 25 kernels of ~10 µs per layer and pass
# peft runs LoRA's extra work per adapted layer as small memory-bound kernels (dropout over the input,
# B·A·x scaled and added to the output, the same backward). Per token they move about this many bytes
# per input and output feature of each adapted layer: 13 reproduces the share of GPU time the profiler
# put in them for all-linear QLoRA on the H100, 16 % (bench/results/profile_step.jsonl).
LORA_BYTES_PER_FEATURE = 13.0
# The fixed cost of a micro-batch grows with the kernels it launches: a decoder layer's own forward
# is about 20 kernels (norms, four projections, rotary, attention, MLP, residual adds), an adapted
# layer adds 5-6 (dropout, A, B, scale, add). Leave-one-out over the calibration rows is flat
# between 1 and 7 here (rms error 9-7 %).
LAYER_KERNELS_IN_ADAPTED_LAYERS = 3
# The first steps of a run, over what the steady rate would take: 1.0-4.7 s in twelve H100 runs
# (bench/results/cost_accuracy.jsonl: train_seconds - processed_tokens / steady rate).
WARMUP_SECONDS = (1.0, 5.0)
# Hub datasets the shipped recipes train on, so `cloudtune cost` can price them before the training
# machine downloads them: the published number of training rows, with guanaco's lengths (lognormal,
# median 350 tokens, sigma 0.8: the distribution the benchmarks in bench/common.py use).
HUB_DATASET_ROWS = {"mlabonne/guanaco-llama2-1k": 1000, "timdettmers/openassistant-guanaco": 9846}

# Minutes from "launch" to a machine that answers SSH, then SkyPilot's runtime, the image pull and
# `pip install .[train]` (DESIGN.md: about 3 min), and teardown until billing stops.
PROVISION_MINUTES = {"aws": (3, 8), "gcp": (2, 6), "azure": (4, 10), "lambda": (3, 8), "runpod": (1, 4),
                     "vast": (1, 6), "nebius": (3, 8), "hyperbolic": (2, 6), "fluidstack": (5, 12)}
DEFAULT_PROVISION_MINUTES = (3, 10)
SETUP_MINUTES = (3, 8)
TEARDOWN_MINUTES = (1, 3)
HUB_DOWNLOAD_BYTES_PER_S = (400e6, 100e6)  # from the Hugging Face hub to a cloud machine
LOAD_BYTES_PER_S = (2e9, 0.5e9)  # safetensors into GPU memory (quantising on the way)
UPLOAD_BYTES_PER_S = (20e6, 5e6)  # the dataset bundle from here
PULL_BYTES_PER_S = (50e6, 10e6)  # outputs back to here


# ----------------------------------------------------------------------------------------------
# Work: how many tokens, in which micro-batches


@dataclass(frozen=True)
class Work:
    tokens: int  # trained tokens (what receipts count)
    processed: float  # tokens the GPU computes on, padding included
    row_tokens: int  # widest row a micro-batch can hold: the peak memory's sequence length
    width: float  # average padded row width
    exact: bool
    note: str = ""
    attention_span: float = 0.0  # keys a token attends to on average, for attention FLOPs (0: width / 2)

    @property
    def span(self) -> float:
        return self.attention_span or self.width / 2


def document_attention_span(report: DatasetReport, cap: int) -> float:
    """Keys a token attends to when attention stays inside each packed document: a token of a
    document of L tokens sees L/2 on average, and longer documents hold more of the tokens, so the
    mean is E[L²] / (2·E[L]) over the documents (from the length percentiles)."""
    lengths = [min(cap, max(1, length)) for length in getattr(report, "length_percentiles", None) or []]
    if len(lengths) < 2:
        return min(cap, report.tokens / max(report.rows, 1)) / 2
    mids = [(a + b) / 2 for a, b in zip(lengths[:-1], lengths[1:], strict=True)]
    return sum(m * m for m in mids) / (2 * sum(mids))


def attends_per_document(recipe: Recipe) -> bool:
    """Packed rows on a GPU run per-document attention unless the recipe names another kernel."""
    return recipe.training.packing and recipe.training.attention in ("auto", "documents")


def plan_work(recipe: Recipe, report: DatasetReport, micro_batch_size: int | None = None) -> Work:
    spec = recipe.training
    mb = micro_batch_size or spec.micro_batch_size
    cap = spec.max_seq_len
    if report.rows == 0:  # hub dataset: counted on the training machine
        rows_per_step = mb * spec.gradient_accumulation
        if not spec.max_steps:
            return Work(0, 0.0, cap, cap, False, "tokens unknown: the hub dataset is counted on the training "
                                                "machine; set training.max_steps to price the training itself")
        per_row = cap if spec.packing else cap / 2
        tokens = spec.max_steps * rows_per_step * per_row
        return Work(int(tokens), tokens, cap, per_row, False,
                    f"hub dataset: assumed {per_row:.0f} tokens per row over {spec.max_steps} steps")
    span = document_attention_span(report, cap) if attends_per_document(recipe) else 0.0
    if spec.packing:
        rows = max(1, math.ceil(report.tokens / (cap * PACKING_FILL)))
        width = min(cap, report.tokens / rows / PACKING_FILL)
        processed_per_epoch = rows * width
        row_tokens = min(cap, math.ceil(report.tokens / PACKING_FILL))
    else:
        rows = report.rows
        width = expected_batch_width(report, mb)
        processed_per_epoch = rows * width
        row_tokens = min(cap, report.longest_row_tokens or cap)
    micro_batches = max(1, math.ceil(rows / mb))
    if spec.max_steps:
        total_micro_batches = spec.max_steps * spec.gradient_accumulation
        epochs = total_micro_batches / micro_batches
    else:
        epochs = spec.epochs or 1.0
        steps = math.ceil(epochs * math.ceil(micro_batches / spec.gradient_accumulation))
        epochs = steps * spec.gradient_accumulation / micro_batches
    return Work(tokens=int(report.tokens * epochs), processed=processed_per_epoch * epochs, row_tokens=row_tokens,
                width=width, exact=report.tokens_exact, attention_span=span)


def expected_batch_width(report: DatasetReport, micro_batch_size: int) -> float:
    """Mean padded width of an unpacked micro-batch: the expected longest of its rows.

    With the length percentiles q_0..q_100 the longest of n random rows is at most q_p with
    probability (p/100)^n.
    """
    percentiles = getattr(report, "length_percentiles", None)
    mean = report.tokens / max(report.rows, 1)
    if not percentiles or micro_batch_size <= 1:
        return mean
    n = micro_batch_size
    cdf = [(p / 100) ** n for p in range(len(percentiles))]
    expected = sum((cdf[k] - cdf[k - 1]) * (percentiles[k] + percentiles[k - 1]) / 2 for k in range(1, len(cdf)))
    return max(mean, expected)


# ----------------------------------------------------------------------------------------------
# Throughput


@dataclass(frozen=True)
class StepConditions:
    """What a training step's speed depends on, for a plan or for a calibration row."""
    shape: ModelShape
    method: str
    recomputed_share: float  # fraction of layers checkpointed, whose forward pass runs twice
    attention_span: float  # keys a token attends to on average (half its row, or half its document)
    micro_batch_tokens: float = 0.0  # padded tokens per micro-batch (0: not recorded)
    lora_targets: tuple[str, ...] = ()  # adapted module names (none for full fine-tuning)

    @property
    def passes(self) -> float:
        """Forward-pass equivalents: the forward, the backward (twice that when weights get gradients),
        and the recomputed forward of checkpointed layers."""
        return (3 if self.method == "full" else 2) + self.recomputed_share

    @property
    def adapted_per_layer(self) -> list[str]:
        return [m for m in self.lora_targets if m in self.shape.module_shapes()]


def flops_per_token(step: StepConditions) -> float:
    """Matmul FLOPs a token costs; attention's backward costs twice its forward."""
    shape = step.shape
    attention = 4 * shape.layers * step.attention_span * shape.attention_width * (3 + step.recomputed_share)
    return 2.0 * shape.matmul_params * step.passes + attention


def lora_seconds_per_token(step: StepConditions, gpu: str) -> float:
    """Time peft's LoRA spends outside the matmuls: per adapted layer it runs dropout over the input and
    scales and adds B·A·x into the output as separate memory-bound kernels, and again backward."""
    features = sum(sum(step.shape.module_shapes()[m]) for m in step.adapted_per_layer) * step.shape.layers
    forward_share = (1 + step.recomputed_share) / 3  # one of three passes is the forward; recomputing repeats it
    return features * LORA_BYTES_PER_FEATURE * (2 / 3 + forward_share) / (SPECS[gpu].bandwidth_gbs * 1e9)


def launch_weight(step: StepConditions) -> float:
    """A micro-batch's fixed cost relative to all-linear LoRA's: kernels launched per layer, where a
    decoder layer's own count as LAYER_KERNELS_IN_ADAPTED_LAYERS adapted layers."""
    own = LAYER_KERNELS_IN_ADAPTED_LAYERS
    return (own + len(step.adapted_per_layer)) / (own + len(ALL_LINEAR))


def _quant_class(method: str) -> str:
    """Methods whose speed differs: quantised weights are dequantised on every pass; full
    fine-tuning adds an optimizer step over every weight."""
    return {"qlora": "4bit", "8bit": "8bit", "full": "full"}.get(method, "16bit")


def row_conditions(row: dict) -> StepConditions:
    """What a calibration row ran. Only cloudtune's own rows list `lora_targets`: other trainers'
    LoRA overheads stay inside their efficiency."""
    shape = KNOWN_MODELS[row["model"]][1] if row["model"] in KNOWN_MODELS else ModelShape(**row["shape"])
    share = row["checkpointed_layers"] / shape.layers if "checkpointed_layers" in row \
        else float(row["gradient_checkpointing"])
    return StepConditions(shape, row["method"], share, row.get("attention_span") or row["width"] / 2,
                          row.get("micro_batch_tokens") or 0.0, tuple(row.get("lora_targets", ())))


def _raw_efficiency(row: dict) -> float:
    """Fraction of the datasheet peak a calibration row's matmuls ran at, before per-micro-batch costs."""
    step = row_conditions(row)
    matmul_seconds = 1 / row["tokens_per_s"] - lora_seconds_per_token(step, row["gpu"])
    return flops_per_token(step) / matmul_seconds / (SPECS[row["gpu"]].tflops * 1e12)


def fit_micro_batch_cost(rows: list[dict]) -> float:
    """Each micro-batch costs about as much as this many more tokens would (dequantising every weight,
    kernels too small to fill the GPU, the optimizer step), fitted on cloudtune's own rows that
    record `micro_batch_tokens`: the value under which their efficiencies agree best within each method."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["stack"] == "cloudtune" and row.get("micro_batch_tokens"):
            groups.setdefault(row["quant"], []).append(row)
    groups = {k: v for k, v in groups.items() if len({r["micro_batch_tokens"] for r in v}) > 1}
    if not groups:
        return 0.0

    def spread(extra: float) -> float:
        total = 0.0
        for members in groups.values():
            logs = [math.log(r["raw_efficiency"] * (1 + extra * r["launch_weight"] / r["micro_batch_tokens"]))
                    for r in members]
            mean = sum(logs) / len(logs)
            total += sum((x - mean) ** 2 for x in logs)
        return total

    return float(min(range(0, 20001, 25), key=spread))


def load_calibration_rows(path: Path = CALIBRATION_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calibrate(lines: list[dict]) -> tuple[tuple[dict, ...], float]:
    """(calibration rows with their efficiency, the per-micro-batch cost in tokens)."""
    rows = [{**row, "raw_efficiency": _raw_efficiency(row), "quant": _quant_class(row["method"]),
             "launch_weight": launch_weight(row_conditions(row))} for row in lines]
    extra = fit_micro_batch_cost(rows)
    for row in rows:
        tokens = row.get("micro_batch_tokens")
        row["efficiency"] = row["raw_efficiency"] * (1 + extra * row["launch_weight"] / tokens if tokens else 1)
    return tuple(rows), extra


@lru_cache(maxsize=1)
def calibration() -> tuple[tuple[dict, ...], float]:
    return calibrate(load_calibration_rows())


def calibration_rows() -> tuple[dict, ...]:
    return calibration()[0]


def efficiency_band(method: str, checkpointing: bool, fused_kernels: bool = False,
                    rows: tuple[dict, ...] | None = None) -> tuple[float, float, str]:
    """(low, high) fraction of the datasheet peak, and which rows it rests on.

    cloudtune's own runs describe the trainer that will run (checkpointing's recomputation is in the
    FLOP count already, so they count with or without it); a method it has not measured yet is
    scaled from its bf16 LoRA runs; other stacks' runs, with the same checkpointing, come last.
    """
    quant = _quant_class(method)
    rows = calibration_rows() if rows is None else rows

    def own(kind: str) -> list[dict]:
        mine = [r for r in rows if r["stack"] == "cloudtune" and r["quant"] == kind]
        return [r for r in mine if r.get("fused_kernels", False) == fused_kernels] or mine

    chosen, factor, basis = own(quant), (1.0, 1.0), "cloudtune run(s)"
    if not chosen and quant in RELATIVE_TO_16BIT and own("16bit"):
        chosen, factor, basis = own("16bit"), RELATIVE_TO_16BIT[quant], "cloudtune bf16 LoRA run(s), scaled"
    if not chosen:
        same = [r for r in rows if r["quant"] == quant]
        chosen = [r for r in same if r["gradient_checkpointing"] == checkpointing] or same
        basis = "reference run(s) of other trainers"
    values = [r["efficiency"] for r in chosen]
    median = statistics.median(values)
    low = max(min(values), median / MAX_SPREAD)
    high = min(max(values), median * MAX_SPREAD)
    low, high = min(low, median * (1 - MIN_SPREAD)), max(high, median * (1 + MIN_SPREAD))
    return low * factor[0], high * factor[1], f"{len(chosen)} {basis}"


def gpu_tokens_per_second(offer_gpu: str, step: StepConditions, fused_kernels: bool = False,
                          calibrated: tuple[tuple[dict, ...], float] | None = None) -> tuple[float, float]:
    """Processed tokens per second (low, high) on one GPU of this kind.

    The trainer is single-process: it uses one GPU whatever the machine has, so more GPUs add cost
    and no speed (make_plan says so). `calibrated`: other calibration rows than the bundled ones,
    as `calibrate` returns them.
    """
    spec = SPECS[offer_gpu]
    rows, extra = calibrated or calibration()
    flops = flops_per_token(step)
    if step.micro_batch_tokens:
        flops *= 1 + extra * launch_weight(step) / step.micro_batch_tokens
    low, high, _ = efficiency_band(step.method, step.recomputed_share > 0, fused_kernels, rows=rows)
    lora_seconds = lora_seconds_per_token(step, offer_gpu)
    rates = [1 / (flops / (spec.tflops * 1e12 * e) + lora_seconds) for e in (low, high)]
    if step.micro_batch_tokens:
        floor = STEP_FLOOR_SECONDS + step.shape.layers * step.passes * LAYER_PASS_SECONDS
        rates = [min(rate, step.micro_batch_tokens / floor) for rate in rates]
    return rates[0], rates[1]


def train_seconds(processed: tuple[float, float], tokens_per_s: tuple[float, float]) -> tuple[float, float]:
    """(low, high) seconds the trainer reports: the steady rate over the processed tokens, plus the
    first steps, which pay for cuBLAS's kernel choice and the allocator's growth."""
    return (processed[0] / tokens_per_s[1] + WARMUP_SECONDS[0], processed[1] / tokens_per_s[0] + WARMUP_SECONDS[1])


# ----------------------------------------------------------------------------------------------
# Overheads


def overhead_hours(recipe: Recipe, model: ModelInfo, setup: TrainSetup, cloud: str) -> tuple[float, float, str]:
    minutes = [a + b + c for a, b, c in zip(PROVISION_MINUTES.get(cloud, DEFAULT_PROVISION_MINUTES),
                                            SETUP_MINUTES, TEARDOWN_MINUTES, strict=True)]
    seconds = [m * 60.0 for m in minutes]
    download = 0.0 if recipe.model.init else model.download_bytes
    dataset = recipe.dataset_file()
    upload = dataset.stat().st_size if dataset is not None and dataset.exists() else 0
    if recipe.uses_lora:
        outputs = lora_params(model.shape, setup) * 4.0  # adapters are saved in fp32
    else:
        outputs = model.shape.params * 2.0
    if recipe.outputs.merge and recipe.uses_lora:
        outputs += model.shape.params * 2.0
    for k in (0, 1):
        seconds[k] += (download / HUB_DOWNLOAD_BYTES_PER_S[k] + model.download_bytes / LOAD_BYTES_PER_S[k]
                       + upload / UPLOAD_BYTES_PER_S[k] + outputs / PULL_BYTES_PER_S[k])
    parts = ["provisioning", "setup"]
    if download:
        parts.append(f"{download / 1e9:.1f} GB model download")
    if outputs > 1e8:
        parts.append(f"{outputs / 1e9:.1f} GB of outputs back")
    parts.append("teardown")
    return seconds[0] / 3600, seconds[1] / 3600, ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# The plan


def choose_batch(recipe: Recipe, shape: ModelShape, setup: TrainSetup, row_tokens: int,
                 usable_bytes: float) -> tuple[int, int, MemoryPeak, bool]:
    """(micro-batch, checkpointed layers, memory, fits): the recipe's micro-batch with as few layers
    checkpointed as fit (the trainer's auto does the same on the machine), else a smaller micro-batch
    (the run keeps the effective batch by accumulating more)."""
    layers = shape.layers
    options = {"auto": range(layers + 1), "on": (layers,), "off": (0,)}[recipe.training.gradient_checkpointing]
    wanted = recipe.training.micro_batch_size
    # divisors only, so that accumulating more micro-batches keeps the effective batch exactly
    for mb in (d for d in range(wanted, 0, -1) if wanted % d == 0):
        for recomputed in options:
            memory = memory_peak(shape, setup, mb * row_tokens, recomputed)
            if required_bytes(memory) <= usable_bytes:
                return mb, recomputed, memory, True
    mb, recomputed = wanted, options[-1]
    return mb, recomputed, memory_peak(shape, setup, mb * row_tokens, recomputed), False


def precision_problem(recipe: Recipe, gpu: str) -> str | None:
    """Why the trainer would refuse this GPU, or None."""
    try:
        recipe.gpu_precision(gpu, SPECS[gpu].bf16)
    except CloudtuneError as refused:
        return refused.message
    return None


def estimate_offer(recipe: Recipe, report: DatasetReport, model: ModelInfo, offer: Offer, spot: bool) -> Estimate:
    setup = TrainSetup.from_recipe(recipe)
    usable = usable_gib(offer) * GIB
    if recipe.training.memory_limit_gib:  # the trainer caps its allocator there; the CUDA context comes on top
        usable = min(usable, recipe.training.memory_limit_gib * GIB + CUDA_CONTEXT_BYTES)
    base = plan_work(recipe, report)
    mb, recomputed, memory, fits = choose_batch(recipe, model.shape, setup, base.row_tokens, usable)
    work = plan_work(recipe, report, mb) if mb != recipe.training.micro_batch_size else base
    step = StepConditions(model.shape, recipe.method, recomputed / model.shape.layers, work.span, mb * work.width,
                          setup.lora_targets if recipe.uses_lora else ())
    tps_low, tps_high = gpu_tokens_per_second(offer.gpu, step, setup.impl.fused_loss)
    checkpointing = checkpointing_note(recomputed, model.shape.layers)
    processed = (work.processed * (1 - TOKENS_UNCERTAINTY), work.processed * (1 + TOKENS_UNCERTAINTY)) \
        if not work.exact else (work.processed, work.processed)
    train_low, train_high = (seconds / 3600 for seconds in train_seconds(processed, (tps_low, tps_high)))
    over_low, over_high, over_what = overhead_hours(recipe, model, setup, offer.cloud)
    hours_low, hours_high = train_low + over_low, train_high + over_high
    price = offer.spot_price_per_hour if spot and offer.spot_price_per_hour is not None else offer.price_per_hour
    real = work.tokens / work.processed if work.processed else 1.0  # trained share of processed tokens
    why = (f"{_si(work.tokens)} tokens at {_si(tps_low * real)}–{_si(tps_high * real)} tok/s "
           f"({recipe.method}{'' if SPECS[offer.gpu].bf16 else ' in fp16 with loss scaling'}, micro-batch {mb}, "
           f"checkpointing {checkpointing}) "
           f"+ {over_low * 60:.0f}–{over_high * 60:.0f} min {over_what}")
    if not fits:
        smallest = memory_peak(model.shape, setup, base.row_tokens, recomputed)
        why = (f"needs {required_bytes(smallest) / GIB:.1f} GiB even at micro-batch 1 with checkpointing "
               f"{checkpointing}; {offer.gpu} has {usable / GIB:.1f} GiB usable")
    refused = precision_problem(recipe, offer.gpu)
    if refused:
        fits, why = False, refused
    return Estimate(offer=offer, spot=spot and offer.spot_price_per_hour is not None, fits=fits,
                    peak_gib=round(memory.gib, 2), micro_batch_size=mb, gradient_checkpointing=recomputed > 0,
                    checkpointed_layers=recomputed,
                    tokens=work.tokens, tokens_per_s_low=round(tps_low * real, 1),
                    tokens_per_s_high=round(tps_high * real, 1), hours_low=round(hours_low, 3),
                    hours_high=round(hours_high, 3), cost_low=round(hours_low * price, 2),
                    cost_high=round(hours_high * price, 2), why=why)


def make_plan(recipe: Recipe, report: DatasetReport, *, gpu: str | None = None, clouds: list[str] | None = None,
              spot: bool | None = None, offers: list[Offer] | None = None) -> Plan:
    """Every offer that matches the recipe's compute wishes, with fit and cost; fitting ones first, cheapest first."""
    model = resolve_model(recipe)
    gpu = gpu or recipe.compute.gpu
    clouds = clouds or recipe.compute.cloud or None
    spot = recipe.compute.spot if spot is None else spot
    notes: list[str] = []
    catalog_info: dict = {}
    if offers is None:
        catalog = load_offers(clouds, recipe.compute.region)
        offers, snapshot = catalog.offers, catalog.snapshot_date
        catalog_info = {"prices": catalog.describe(), "sources": catalog.sources, "from_cache": catalog.from_cache,
                        "problems": catalog.problems}
        notes += catalog.problems
    else:
        snapshot = "given offers"
        if clouds:
            offers = [o for o in offers if o.cloud in {c.lower() for c in clouds}]
    candidates = [o for o in offers if o.gpu in SPECS]
    if gpu:
        match = match_gpus(gpu)
        candidates = [o for o in candidates if o.gpu in match.names]
        if match.note:
            notes.append(match.note)
    count = recipe.compute.gpu_count
    candidates = [o for o in candidates if o.gpu_count == count]
    if count > 1:
        notes.append(f"compute.gpu_count {count}: cloudtune trains on one GPU per machine so far, so the other "
                     f"{count - 1} are paid for and idle; priced at one GPU's speed")
    if spot:
        candidates = [o for o in candidates if o.spot_price_per_hour is not None]
    if not candidates:
        wanted = " ".join(filter(None, [f"{count}× {gpu or 'any GPU'}", "spot" if spot else "",
                                        f"on {', '.join(clouds)}" if clouds else ""]))
        raise CloudtuneError(f"no offer in the price catalog matches {wanted}.",
                             "`cloudtune gpus` lists what there is; widen --gpu/--cloud, drop --spot, or "
                             "change compute.gpu_count.")
    if report.rows == 0:
        known = hub_report(recipe)
        if known is not None:
            report = known
            notes.append(f"hub dataset {recipe.dataset.hub}: {known.rows:,} rows as published, lengths assumed "
                         "guanaco-like; the training machine counts the real tokens")
    work = plan_work(recipe, report)
    if work.note:
        notes.append(work.note)
    if not model.exact:
        notes.append(f"model shape {model.source}")
    estimates = [estimate_offer(recipe, report, model, offer, spot) for offer in candidates]
    estimates.sort(key=lambda e: (not e.fits, e.cost_high, e.cost_low, e.offer.cloud, e.offer.instance_type))
    return Plan(tokens=work.tokens, tokens_exact=work.exact, snapshot_date=snapshot, estimates=estimates,
                notes=notes, model_source=model.source, catalog=catalog_info)


def hub_report(recipe: Recipe) -> DatasetReport | None:
    """An estimated report for a hub dataset cloudtune knows the size of; None for others."""
    rows = HUB_DATASET_ROWS.get(recipe.dataset.hub or "")
    if rows is None:
        return None
    rows = min(rows, recipe.dataset.max_rows or rows)
    cap = recipe.training.max_seq_len
    rng = random.Random(0)
    raw = [max(16, int(rng.lognormvariate(math.log(350), 0.8))) for _ in range(rows)]
    lengths = [min(cap, n) for n in raw]
    return DatasetReport(source=f"hub:{recipe.dataset.hub}", format=recipe.dataset.format, rows=rows,
                         tokens=sum(lengths), tokens_exact=False, truncated_rows=sum(n > cap for n in raw),
                         longest_row_tokens=max(raw), tokenizer="estimate (published rows, guanaco-like lengths)",
                         length_percentiles=percentiles(lengths))


def apply_estimate(recipe: Recipe, chosen: Estimate) -> list[str]:
    """Make the recipe train with the micro-batch the plan found to fit; the effective batch stays.

    Returns what changed, for the CLI to print. Checkpointing stays as the recipe says: with `auto`
    the trainer decides on the machine it lands on, from the same memory model.
    """
    spec = recipe.training
    if chosen.micro_batch_size >= spec.micro_batch_size:
        return []
    factor = spec.micro_batch_size // chosen.micro_batch_size
    before = f"{spec.micro_batch_size}×{spec.gradient_accumulation}"
    spec.micro_batch_size, spec.gradient_accumulation = chosen.micro_batch_size, spec.gradient_accumulation * factor
    return [f"micro-batch × accumulation {before} → {spec.micro_batch_size}×{spec.gradient_accumulation} "
            f"so it fits {chosen.offer.gpu}"]


def local_estimate() -> dict:
    """`--backend local`: this machine, nothing rented, nothing to pay."""
    return {"gpu": "local", "price_per_hour": 0.0, "est_cost_low": 0.0, "est_cost_high": 0.0}


def check_budget(plan_or_estimate, max_cost: float | None) -> None:
    """Refuse a plan whose high estimate exceeds `max_cost` dollars."""
    if max_cost is None:
        return
    chosen = plan_or_estimate.chosen if isinstance(plan_or_estimate, Plan) else plan_or_estimate
    if chosen is None:
        return
    if isinstance(plan_or_estimate, Plan) and not plan_or_estimate.tokens:
        raise CloudtuneError(f"max_cost ${max_cost:.2f} cannot be checked: the number of tokens is unknown "
                             "before the training machine counts the hub dataset.",
                             "Set training.max_steps, or train from a local dataset file.")
    if chosen.cost_high > max_cost:
        raise CloudtuneError(
            f"the cheapest plan that fits costs up to ${chosen.cost_high:.2f} "
            f"({chosen.offer.gpu}×{chosen.offer.gpu_count} on {chosen.offer.cloud}, {chosen.hours_low:.1f}–"
            f"{chosen.hours_high:.1f} h at ${chosen.price_per_hour:.2f}/h), over max_cost ${max_cost:.2f}.",
            "Raise compute.max_cost (or --max-cost), train fewer tokens (epochs, max_steps, max_rows), "
            "or see `cloudtune cost` for the options.")


def _si(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"
