"""Where a training step's GPU time goes: torch.profiler over a few steps of a train_speed profile.

  python bench/profile_step.py [--profile cloudtune-qlora] [--shape 7b] [--top 30]

Runs the trainer in this process (the same `loop.train` a rented machine runs) and profiles three
steps after the warm-up. Prints the kernels that took the most GPU time, and appends the top ones,
grouped into families, to bench/results/profile_step.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import make_model, record, write_dataset  # noqa: E402
from train_speed import CLOUDTUNE_PROFILES, cloudtune_recipe  # noqa: E402

# kernel-name fragments → the family a step's time is reported under
FAMILIES = [("dequant", ("dequantize", "kDequantize")), ("attention", ("flash", "fmha", "attention", "varlen")),
            ("gemm", ("gemm", "sm90", "cutlass", "nvjet", "cublas")), ("liger", ("_kernel", "triton")),
            ("elementwise", ("elementwise", "vectorized", "reduce", "copy", "cat", "fill"))]


def family(kernel: str) -> str:
    lowered = kernel.lower()
    for name, fragments in FAMILIES:
        if any(fragment.lower() in lowered for fragment in fragments):
            return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="cloudtune-qlora", choices=sorted(CLOUDTUNE_PROFILES))
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ct-speed")
    args = parser.parse_args()

    import torch
    import yaml
    from torch.profiler import ProfilerActivity, profile

    from cloudtune.recipe import load_recipe
    from cloudtune.train import loop

    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / f"llama-{args.shape}", args.shape)
    data = write_dataset(args.work / "guanaco-like.jsonl", n=4000)
    warmup, profiled = 3, 3
    path = args.work / f"{args.profile}-profiled.yaml"
    path.write_text(yaml.safe_dump(cloudtune_recipe(args.profile, model, data, warmup + profiled)))

    real_step, calls = loop.train_step, []
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def profiled_step(*step_args, **step_kwargs):
        # the wall clock of the last warm-up steps, unprofiled: beside the GPU's busy time it says how long
        # the GPU waits on the host each step
        torch.cuda.synchronize()
        calls.append(time.perf_counter())
        if len(calls) == warmup + 1:
            profiler.__enter__()
        result = real_step(*step_args, **step_kwargs)
        if len(calls) == warmup + profiled:
            profiler.__exit__(None, None, None)
        return result

    loop.train_step = profiled_step
    out = args.work / f"{args.profile}-profiled"
    loop.train(load_recipe(path), out)

    kernels = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels)
    if not total_us:
        print("no GPU kernels were recorded: this benchmark needs an NVIDIA GPU")
        return 1
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    wall_ms = (calls[warmup] - calls[1]) * 1e3 / (warmup - 1)  # steps 2..warmup, after the first's set-up
    gpu_ms = total_us / 1e3 / profiled
    families: dict[str, float] = {}
    for event in kernels:
        families[family(event.key)] = families.get(family(event.key), 0.0) + event.self_device_time_total
    print(f"GPU time over {profiled} steps: {total_us / 1e3:.0f} ms; an unprofiled step takes {wall_ms:.0f} ms "
          f"of wall time (the GPU busy {gpu_ms / wall_ms:.0%} of it)")
    for event in kernels[:args.top]:
        share, ms = event.self_device_time_total / total_us, event.self_device_time_total / 1e3 / profiled
        print(f"{share:6.1%} {ms:8.1f} ms/step {event.count // profiled:6d}×  {event.key[:110]}")
    record("profile_step", dict(profile=args.profile, shape=args.shape, gpu=torch.cuda.get_device_name(),
                                gpu_ms_per_step=round(gpu_ms, 1), wall_ms_per_step=round(wall_ms, 1),
                                gpu_busy=round(gpu_ms / wall_ms, 3),
                                kernels_per_step=sum(e.count for e in kernels) // profiled,
                                families={k: round(v / total_us, 3) for k, v in sorted(families.items())},
                                top=[dict(kernel=e.key[:120], share=round(e.self_device_time_total / total_us, 4))
                                     for e in kernels[:12]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
