"""Training speed on one GPU: a step's FLOPs over the datasheet bf16 peak times a calibrated efficiency.

On top of the matmuls come LoRA's memory-bound kernels (planning/flops.py) and a fixed cost per
micro-batch, so small micro-batches run slower; no micro-batch beats its kernel launches. Every
rate is a low–high range from the calibration's efficiency band.
"""
from __future__ import annotations

from .calibration import calibration, efficiency_band
from .flops import StepConditions, flops_per_token, launch_weight, lora_seconds_per_token
from .gpus import SPECS

# A step cannot beat its kernel launches: tiny models are launch-bound, not FLOP-bound.
STEP_FLOOR_SECONDS = 5e-3
LAYER_PASS_SECONDS = 0.25e-3  # about 25 kernels of ~10 µs per layer and pass
# The first steps of a run, over what the steady rate would take: 1.0-4.7 s in twelve H100 runs
# (bench/results/cost_accuracy.jsonl: train_seconds - processed_tokens / steady rate).
WARMUP_SECONDS = (1.0, 5.0)


def gpu_tokens_per_second(offer_gpu: str, step: StepConditions, fused_kernels: bool = False,
                          calibrated: tuple[tuple[dict, ...], float] | None = None) -> tuple[float, float]:
    """Processed tokens per second (low, high) on one GPU of this kind.

    Several GPUs multiply it by their number and their scaling (calibration.scaling_efficiency;
    the planner does). `calibrated`: other calibration rows than the bundled ones, as `calibrate`
    returns them.
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
