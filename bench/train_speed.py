"""Training speed, side by side in one GPU run: the seeds' recipe, Unsloth, and cloudtune's trainer.

  python bench/train_speed.py --anchors DIR [--profiles seed-qlora,unsloth-nogc,cloudtune-qlora] [--steps N]
                              [--torchrun]   # each cloudtune profile also under torchrun, one process

DIR holds the anchor scripts (seed_baseline.py, unsloth_bench.py from the shared bench folder), which
are run as they are; cloudtune runs through `python -m cloudtune.train` like on a rented machine.
Every profile trains the same Llama-2-7B-shaped random model on the same guanaco-like length
distribution. Prints a table (real tok/s, MFU, peak GiB, ratio to seed-qlora) and appends JSON lines to
bench/results/train_speed.jsonl.

MFU is the model's FLOPs over the bf16 matmul rate measured on this GPU at the start of the run (stated
in every row): a frozen base counts 4·N per token (forward and input gradient), the adapters 6 per
trainable weight, attention that of the real documents' lengths (per-document causal attention over
the guanaco-like lengths), recomputation nothing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    SHAPES,
    bf16_peak_tflops,
    guanaco_lengths,
    make_model,
    record,
    train_cloudtune,
    write_dataset,
)

sys.path.insert(0, str(REPO))
from cloudtune.planning.flops import attention_span, model_flops_per_token  # noqa: E402
from cloudtune.planning.memory import ModelShape, TrainSetup, lora_params  # noqa: E402

# cloudtune profiles: recipe overrides on top of the base below.
CLOUDTUNE_PROFILES = {
    # what a user gets from the defaults: attention, checkpointing and kernels on auto
    "cloudtune-qlora": dict(method="qlora", training=dict(micro_batch_size=2, max_seq_len=4096)),
    "cloudtune-lora": dict(method="lora", training=dict(micro_batch_size=2, max_seq_len=4096)),
    "cloudtune-fp8": dict(method="fp8", training=dict(micro_batch_size=2, max_seq_len=4096)),
    # For 24 GB cards (A10, L4, 4090): the allocator is capped at 22 GiB on the big GPU and auto
    # checkpointing recomputes only as many layers as that cap needs.
    "cloudtune-qlora-24g": dict(method="qlora", training=dict(micro_batch_size=1, max_seq_len=4096,
                                                                memory_limit_gib=22)),
    "cloudtune-qlora-24g-mb2": dict(method="qlora", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                                    memory_limit_gib=22)),
    "cloudtune-fp8-24g-mb2": dict(method="fp8", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                                memory_limit_gib=22)),
    # the path of GPUs without bf16 (T4, V100): fp16 autocast with loss scaling, rehearsed on this GPU
    "cloudtune-qlora-fp16": dict(method="qlora", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                                 precision="fp16")),
    # ablations: the dense packed mask instead of per-document attention; every layer checkpointed
    "cloudtune-qlora-sdpa": dict(method="qlora", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                                 attention="sdpa")),
    "cloudtune-qlora-gc": dict(method="qlora", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                               gradient_checkpointing="on")),
    "cloudtune-qlora-nofuse": dict(method="qlora", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                                   fused_kernels="off")),
    "cloudtune-lora-nofuse": dict(method="lora", training=dict(micro_batch_size=2, max_seq_len=4096,
                                                                 fused_kernels="off")),
}
TORCHRUN_SUFFIX = "@torchrun1"
ANCHOR_PROFILES = {"seed-qlora": "seed_baseline.py", "seed-lora": "seed_baseline.py",
                   "unsloth-nogc": "unsloth_bench.py", "unsloth-gc": "unsloth_bench.py",
                   "unsloth-packed": "unsloth_bench.py"}


def cloudtune_recipe(profile: str, model: Path, data: Path, steps: int) -> dict:
    spec = CLOUDTUNE_PROFILES[profile]
    training = dict(max_steps=steps, learning_rate=2e-4, lr_scheduler="constant", warmup_ratio=0.0, packing=True,
                    optimizer="adamw", **spec["training"])
    return dict(name=profile, model=dict(name=str(model)), method=spec["method"],
                lora=dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
                dataset=dict(path=str(data), format="completion"), training=training)


def profile_method(profile: str) -> str:
    if profile in CLOUDTUNE_PROFILES:
        return CLOUDTUNE_PROFILES[profile]["method"]
    return "lora" if "lora" in profile and "qlora" not in profile else "qlora"


def with_mfu(row: dict, shape: ModelShape, span: float, peak_tflops: float) -> dict:
    """The row with its model FLOPs per token and MFU; the anchors that do not report their trainable
    weights are counted with cloudtune's all-linear r=16 adapters, which they all train."""
    if "real_tok_per_s" not in row:
        return row
    method = profile_method(row["profile"].removesuffix(TORCHRUN_SUFFIX))
    trainable = row.get("trainable_params") or lora_params(shape, TrainSetup(method=method))
    flops = model_flops_per_token(shape, method, span, 0 if method == "full" else trainable)
    mfu = row["real_tok_per_s"] * flops / (peak_tflops * 1e12)
    return {**row, "model_flops_per_token": round(flops), "attention_span": round(span, 1),
            "bf16_peak_tflops": round(peak_tflops, 1), "mfu": round(mfu, 4)}


def run_cloudtune(profile: str, model: Path, data: Path, steps: int, warmup: int, work: Path,
                  torchrun: bool = False) -> dict:
    import yaml

    recipe = work / f"{profile}.yaml"
    recipe.write_text(yaml.safe_dump(cloudtune_recipe(profile, model, data, steps + warmup)))
    out = work / (profile + TORCHRUN_SUFFIX if torchrun else profile)
    proc = train_cloudtune(recipe, out, torchrun=torchrun)
    profile = profile + TORCHRUN_SUFFIX if torchrun else profile
    if proc.returncode != 0:
        return dict(profile=profile, error=proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = rows[warmup:]
    seconds = measured[-1]["seconds"] - (rows[warmup - 1]["seconds"] if warmup else 0)
    tokens = sum(r["step_tokens"] for r in measured)
    run = json.loads((out / "run.json").read_text())
    return dict(profile=profile, steps_measured=len(measured), seconds=round(seconds, 3), real_tokens=tokens,
                real_tok_per_s=round(tokens / seconds, 1), peak_mem_gib=run["peak_gpu_gib"],
                gradient_checkpointing=run["gradient_checkpointing"], checkpointed_layers=run["checkpointed_layers"],
                attention=run["attention"], fused_kernels=run.get("fused_kernels"), autocast=run.get("autocast"),
                trainable_params=run["trainable_params"], world_size=run.get("world_size", 1),
                device=run["device"],
                # a step far over the others is a one-off (a kernel built, memory reserved), not the method's pace
                step_seconds=[round(b["seconds"] - a["seconds"], 3) for a, b in itertools.pairwise(rows[warmup - 1:])]
                if warmup else None,
                # every profile sees the same batches in the same order: methods compare on the same tokens
                mean_loss_measured=round(sum(r["loss"] for r in measured) / len(measured), 5))


def run_anchor(profile: str, anchors: Path, model: Path, steps: int, warmup: int, work: Path) -> dict:
    script = anchors / ANCHOR_PROFILES[profile]
    out_json = work / f"{profile}.json"
    args = [sys.executable, str(script)] + (["run"] if script.name == "seed_baseline.py" else []) + [
        "--model", str(model), "--profile", profile, "--steps", str(steps), "--warmup", str(warmup),
        "--json", str(out_json)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.exists():
        return dict(profile=profile, error=proc.stdout[-3000:] + proc.stderr[-3000:])
    return json.loads(out_json.read_text().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--anchors", type=Path, required=True, help="folder with seed_baseline.py, unsloth_bench.py")
    parser.add_argument("--profiles", default="seed-qlora,unsloth-nogc,cloudtune-qlora,cloudtune-lora,"
                                                "cloudtune-qlora-24g-mb2")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shape", default="7b", help="model shape: 7b (the benchmark), 1b, mini (smoke test)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ct-speed")
    parser.add_argument("--torchrun", action="store_true",
                        help="run each cloudtune profile a second time under torchrun with one process")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / f"llama-{args.shape}", args.shape)
    data = write_dataset(args.work / "guanaco-like.jsonl", n=4000)
    shape = ModelShape.from_config(SHAPES[args.shape])
    span = attention_span(guanaco_lengths(4000))
    peak = bf16_peak_tflops()
    print(f"bf16 matmul peak measured on this GPU: {peak:.0f} TFLOP/s; attention span {span:.1f} keys/token",
          flush=True)
    results = []
    for profile in args.profiles.split(","):
        if profile in CLOUDTUNE_PROFILES:
            rows = [run_cloudtune(profile, model, data, args.steps, args.warmup, args.work, torchrun=launcher)
                    for launcher in ((False, True) if args.torchrun else (False,))]
        else:
            rows = [run_anchor(profile, args.anchors, model, args.steps, args.warmup, args.work)]
        for row in rows:
            row = with_mfu(row, shape, span, peak)
            results.append(row)
            record("train_speed", row)
    base = next((r for r in results if r["profile"] == "seed-qlora" and "real_tok_per_s" in r), None)
    print(f"\n{'profile':<26}{'real tok/s':>12}{'MFU':>8}{'peak GiB':>10}{'× seed-qlora':>14}"
          f"   (MFU over {peak:.0f} TFLOP/s bf16, measured)")
    for row in results:
        if "error" in row:
            print(f"{row['profile']:<26}  failed: {row['error'][-300:]!r}")
            continue
        ratio = f"{row['real_tok_per_s'] / base['real_tok_per_s']:.2f}" if base else "-"
        print(f"{row['profile']:<26}{row['real_tok_per_s']:>12,.0f}{row['mfu']:>8.1%}"
              f"{row.get('peak_mem_gib') or 0:>10.1f}{ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
