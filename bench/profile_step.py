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
# (first match wins: PyTorch's own kernels are named "..._kernel" too, so they are told apart before Triton's)
FAMILIES = [("dequant", ("dequantize", "kDequantize")), ("attention", ("flash", "fmha", "attention", "varlen")),
            ("gemm", ("gemm", "sm90", "cutlass", "nvjet", "cublas")),
            ("elementwise", ("at::native", "elementwise", "vectorized", "reduce", "memcpy", "memset", "CatArray")),
            ("triton", ("_kernel", "triton"))]


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
    idle = idle_gaps(profiler, torch, profiled)
    print(f"GPU idle between kernels: {idle['idle_ms_per_step']:.1f} ms/step, {idle['gaps_per_step']} gaps of "
          f"over {GAP_US} µs a step; the longest, with the kernels on either side:")
    for gap in idle["longest"]:
        print(f"  {gap['us']:8.0f} µs  after {gap['after'][:50]}  before {gap['before'][:50]}\n"
              f"            host: {gap['host_stack'][:160]}")
    print("idle summed by what the host was doing:")
    for name, ms in idle["waited_for"]:
        print(f"  {ms:6.2f} ms/step  {name[:100]}")
    record("profile_step", dict(profile=args.profile, shape=args.shape, gpu=torch.cuda.get_device_name(),
                                idle_ms_per_step=idle["idle_ms_per_step"], gaps_per_step=idle["gaps_per_step"],
                                longest_gaps=idle["longest"][:10],
                                gpu_ms_per_step=round(gpu_ms, 1), wall_ms_per_step=round(wall_ms, 1),
                                gpu_busy=round(gpu_ms / wall_ms, 3),
                                kernels_per_step=sum(e.count for e in kernels) // profiled,
                                families={k: round(v / total_us, 3) for k, v in sorted(families.items())},
                                top=[dict(kernel=e.key[:120], share=round(e.self_device_time_total / total_us, 4))
                                     for e in kernels[:12]]))
    return 0


GAP_US = 20  # shorter waits between kernels are the launch latency of a GPU that is kept fed


def idle_gaps(profiler, torch, steps: int) -> dict:
    """Where the GPU had nothing to run: gaps between consecutive device activities (kernels, copies) of
    the profiled steps, the longest with what the host was doing meanwhile (the innermost host op that
    spans the gap's middle), and the idle time summed by that host op."""
    events = profiler.events()
    activity = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: e.time_range.start)
    gaps, busy_until, previous = [], None, ""
    for event in activity:
        start, end = event.time_range.start, event.time_range.end
        if busy_until is not None and start - busy_until > GAP_US:
            gaps.append(dict(us=round(start - busy_until), after=previous, before=event.name,
                             at=(busy_until + start) / 2))
        if busy_until is None or end > busy_until:
            busy_until, previous = end, event.name
    by_host_op: dict[str, float] = {}
    open_ops, upcoming = [], iter(host)  # a sweep over the gaps in time order: the host ops open at each
    pending = next(upcoming, None)
    for gap in gaps:
        while pending is not None and pending.time_range.start <= gap["at"]:
            open_ops.append(pending)
            pending = next(upcoming, None)
        open_ops = [e for e in open_ops if e.time_range.end >= gap["at"]]
        spanning = open_ops
        gap["host"] = min(spanning, key=lambda e: e.time_range.end - e.time_range.start).name if spanning else "-"
        gap["host_stack"] = " < ".join(e.name for e in sorted(spanning, key=lambda e: e.time_range.end
                                                              - e.time_range.start)[:4])
        del gap["at"]
        by_host_op[gap["host"]] = by_host_op.get(gap["host"], 0.0) + gap["us"]
    return dict(idle_ms_per_step=round(sum(g["us"] for g in gaps) / 1e3 / steps, 2), gaps_per_step=len(gaps) // steps,
                longest=sorted(gaps, key=lambda g: g["us"], reverse=True)[:25],
                waited_for=[(name, round(us / 1e3 / steps, 2)) for name, us in
                            sorted(by_host_op.items(), key=lambda item: item[1], reverse=True)[:25]])


if __name__ == "__main__":
    sys.exit(main())
