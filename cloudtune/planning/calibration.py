"""Calibration: the share of a GPU's datasheet peak that training reaches, fitted on measured runs.

The runs are listed in cloudtune/data/calibration.jsonl (one JSON object a line: stack, gpu, model,
method, gradient_checkpointing, width = padded row width, attention_span = keys a token attends to
on average (width / 2 when absent), micro_batch_tokens, lora_targets, tokens_per_s = processed
tokens incl. padding). Rows measured with cloudtune's own trainer (stack "cloudtune", written by
bench/cost_accuracy.py) take precedence over rows of other stacks for the same method and
checkpointing. 4-bit and 8-bit have their own factors: quantised weights are dequantised on every
pass. The per-micro-batch cost is fitted on the same rows. An efficiency is a low–high band from
the spread of the rows it rests on.

Several GPUs: cloudtune/data/scaling.jsonl holds each GPU's throughput under DDP or FSDP relative
to one GPU of its kind (`scaling_efficiency`). Until multi-GPU runs are measured its rows are
priors from published figures (`"measured": false`, their source in each row); a measured row
(`"measured": true` with gpu_count, num_nodes, and optionally gpu and method) of the same
parallelism and shape replaces them.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .flops import StepConditions, flops_per_token, launch_weight, lora_seconds_per_token
from .gpus import SPECS
from .memory import ModelShape
from .models import KNOWN_MODELS

CALIBRATION_FILE = Path(__file__).parent.parent / "data" / "calibration.jsonl"
SCALING_FILE = CALIBRATION_FILE.with_name("scaling.jsonl")
MIN_SPREAD = 0.12  # no efficiency band is narrower than ±12 %: runs of one recipe vary that much
MAX_SPREAD = 1.35  # nor wider than ×/÷ 1.35 around the median: one odd row should not double a price
# Efficiency relative to cloudtune's bf16 LoRA, for a calibration without runs of the method: 4-bit
# dequantises every weight on each pass; bitsandbytes' LLM.int8 matmul with outlier decomposition
# trains 2-3x slower; full fine-tuning adds an optimizer step over every weight. The bundled
# calibration has runs of each (H100, 2026-11-23: 4-bit 0.76-0.95, 8-bit 0.43-0.50, full 0.47-0.50
# of LoRA's median efficiency), so this only serves calibrations that lack them.
RELATIVE_TO_16BIT = {"4bit": (0.76, 0.95), "8bit": (0.43, 0.5), "full": (0.47, 0.5),
                     # H200, 2026-12-03, one call: fp8 1.24x lora's tokens/s (its matmuls on the FP8 tensor
                     # cores, forward and input gradient), 1.29x qlora's
                     "fp8": (1.1, 1.25)}


def _quant_class(method: str) -> str:
    """Methods whose speed differs: quantised weights are dequantised on every pass; full
    fine-tuning adds an optimizer step over every weight."""
    return {"qlora": "4bit", "8bit": "8bit", "fp8": "fp8", "full": "full"}.get(method, "16bit")


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


@dataclass(frozen=True)
class Scaling:
    """Each GPU's throughput on several GPUs over what it reaches alone, as a low–high band."""

    low: float
    high: float
    measured: bool
    source: str


ALONE = Scaling(1.0, 1.0, True, "one GPU")


@lru_cache(maxsize=1)
def scaling_rows() -> tuple[dict, ...]:
    return tuple(load_calibration_rows(SCALING_FILE))


def scaling_efficiency(parallelism: str, gpus_per_node: int, nodes: int = 1, *, gpu: str | None = None,
                       method: str | None = None, rows: tuple[dict, ...] | None = None) -> Scaling:
    """How well `gpus_per_node` × `nodes` GPUs scale under `parallelism` (ddp | fsdp): measured rows of
    that very shape first, else the priors, one for the parallelism and one more across machines."""
    if gpus_per_node * nodes <= 1:
        return ALONE
    rows = scaling_rows() if rows is None else rows
    measured = [r for r in rows if r["measured"] and r["parallelism"] == parallelism
                and r["gpu_count"] == gpus_per_node and r["num_nodes"] == nodes
                and r.get("gpu") in (None, gpu) and r.get("method") in (None, method)]
    if measured:
        return Scaling(min(r["efficiency_low"] for r in measured), max(r["efficiency_high"] for r in measured), True,
                       f"{len(measured)} measured run(s)")
    priors = [r for r in rows if not r["measured"]]
    within = next(r for r in priors if r["parallelism"] == parallelism and r["num_nodes"] == 1)
    low, high = within["efficiency_low"], within["efficiency_high"]
    if nodes > 1:
        across = next(r for r in priors if r["num_nodes"] > 1)
        low, high = low * across["efficiency_low"], high * across["efficiency_high"]
    return Scaling(low, high, False, "assumed, not measured")
