"""Predicted vs measured: `cloudtune cost`'s time and memory model against cloudtune's trainer on this GPU.

  python bench/cost_accuracy.py --out DIR [--recipes lora-packed,qlora-unpacked,full] [--steps-scale 1.0]

A Llama-2-7B-shaped random model (written on the GPU in seconds, in a child process so this one
holds no GPU memory) and guanaco-like synthetic data (bench/common.py) go through
`python -m cloudtune.train`, as on a rented machine. Before each run the cost model predicts, for
this GPU: whether checkpointing is needed, the peak memory, and the training time (a low–high
range); afterwards the prediction is compared with run.json and metrics.jsonl. About 6 minutes on
an H100; a recipe that would overrun --budget-seconds is skipped and says so. qlora and the 8-bit
optimizer need bitsandbytes: without it qlora is replaced by an unpacked bf16 LoRA run and full
uses plain AdamW.

Each row goes to bench/results/cost_accuracy.jsonl (and DIR): the run's own settings (so
tests/test_memory_model.py re-checks its peak), the figures, and a `calibration` object that can be
appended to cloudtune/data/calibration.jsonl to calibrate the throughput model on this trainer.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHAPES, record, train_cloudtune, write_dataset  # noqa: E402

sys.path.insert(0, str(REPO))


HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
WARMUP_STEPS = 3  # first steps pay for cuBLAS heuristics and allocator growth
RUN_OVERHEAD_SECONDS = 45  # per run: Python and CUDA start, loading and quantising 13 GB, saving

# name -> (method, steps, training overrides, LoRA overrides). Gradient checkpointing is left to
# `auto` unless set, so the trainer's own decision is compared with the planner's. The first four are
# in cloudtune/data/calibration.jsonl; the `oos-` ones are not, and check the model out of sample:
# other LoRA targets and ranks, micro-batch sizes and row widths, 8-bit without checkpointing.
ALL_LINEAR = dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
RECIPES = {
    "lora-packed": ("lora", 150, dict(micro_batch_size=2, max_seq_len=2048, packing=True), ALL_LINEAR),
    "qlora-unpacked": ("qlora", 120, dict(micro_batch_size=4, max_seq_len=1024, packing=False), ALL_LINEAR),
    "lora-unpacked": ("lora", 120, dict(micro_batch_size=4, max_seq_len=1024, packing=False), ALL_LINEAR),
    "full": ("full", 50, dict(micro_batch_size=1, max_seq_len=2048, packing=True, gradient_checkpointing="on",
                              optimizer="adamw_8bit" if HAVE_BNB else "adamw"), None),
    "oos-qlora-qv-4096": ("qlora", 60, dict(micro_batch_size=1, max_seq_len=4096, packing=True),
                          dict(r=64, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])),
    "oos-lora-gc-mb8": ("lora", 50, dict(micro_batch_size=8, max_seq_len=1024, packing=True,
                                         gradient_checkpointing="on"), ALL_LINEAR),
    "oos-8bit-unpacked": ("8bit", 50, dict(micro_batch_size=4, max_seq_len=1024, packing=False), ALL_LINEAR),
    "oos-qlora-mb16-512": ("qlora", 60, dict(micro_batch_size=16, max_seq_len=512, packing=False), ALL_LINEAR),
    # a second out-of-sample set, run after LoRA targets entered the model
    "oos2-lora-attn-r8": ("lora", 80, dict(micro_batch_size=2, max_seq_len=2048, packing=True),
                          dict(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "oos2-qlora-r64-gc": ("qlora", 40, dict(micro_batch_size=4, max_seq_len=2048, packing=True,
                                            gradient_checkpointing="on"),
                          dict(r=64, alpha=128, dropout=0.05, target_modules="all-linear")),
    "oos2-lora-mlp-unpacked": ("lora", 50, dict(micro_batch_size=8, max_seq_len=1024, packing=False),
                               dict(r=16, alpha=32, dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])),
    "oos2-full-mb2": ("full", 40, dict(micro_batch_size=2, max_seq_len=1024, packing=True, gradient_checkpointing="on",
                                       optimizer="adamw_8bit" if HAVE_BNB else "adamw"), None),
}
DEFAULT = "lora-packed,qlora-unpacked,full" if HAVE_BNB else "lora-packed,lora-unpacked,full"


def recipe_data(name: str, model: Path, data: Path, steps_scale: float) -> dict:
    method, steps, training, lora = RECIPES[name]
    recipe = dict(name=f"accuracy-{name}", model=dict(name=str(model)), method=method,
                  dataset=dict(path=str(data), format="completion"),
                  training=dict(max_steps=max(WARMUP_STEPS + 2, round(steps * steps_scale)), learning_rate=1e-4,
                                lr_scheduler="constant", warmup_ratio=0.0, **training))
    if lora:
        recipe["lora"] = lora
    return recipe


def device_gpu() -> tuple[str, float] | None:
    """(name, memory GiB) of GPU 0, asked of nvidia-smi so that this process never opens CUDA."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None
    name, mib = (part.strip() for part in out.split(","))
    return name, float(mib) / 1024


def batches_trained(recipe, steps: int) -> dict:
    """Replays the trainer's batching: tokens computed on (padding included), real tokens, the widest batch."""
    from cloudtune.train.data import Batcher, encode, load_rows
    from cloudtune.train.model import load_tokenizer

    spec = recipe.training
    tokenizer = load_tokenizer(recipe)
    batcher = Batcher(encode(recipe, tokenizer, load_rows(recipe)), spec.micro_batch_size, spec.max_seq_len,
                      spec.packing, spec.seed, tokenizer.pad_token_id)
    processed = real = peak = count = 0
    widths = []
    epoch = 0
    while count < steps * spec.gradient_accumulation:
        for batch, tokens in batcher.epoch(epoch):
            size = batch["input_ids"].numel()
            processed, real, peak = processed + size, real + tokens, max(peak, size)
            widths.append(batch["input_ids"].shape[1])
            count += 1
            if count == steps * spec.gradient_accumulation:
                break
        epoch += 1
    return dict(processed=processed, real=real, peak_tokens=peak, width=sum(widths) / len(widths))


def predict(recipe, gpu: str, memory_gib: float, checkpointed_layers: int | None = None,
            fused_kernels: bool | None = None) -> dict:
    """What `cloudtune cost` says for this recipe on one such GPU (training only, no overheads)."""
    from cloudtune.datasets import inspect_dataset
    from cloudtune.planning.flops import StepConditions
    from cloudtune.planning.gpus import usable_gib
    from cloudtune.planning.memory import GIB, TrainSetup
    from cloudtune.planning.models import resolve_model
    from cloudtune.planning.offers import Offer
    from cloudtune.planning.planner import choose_batch
    from cloudtune.planning.throughput import gpu_tokens_per_second, train_seconds
    from cloudtune.planning.work import plan_work

    report = inspect_dataset(recipe)
    shape = resolve_model(recipe).shape
    setup = TrainSetup.from_recipe(recipe, fused_kernels=fused_kernels)
    offer = Offer("this machine", "-", gpu, gpu, 1, memory_gib, 0.0)
    work = plan_work(recipe, report)
    mb, planned, memory, fits = choose_batch(recipe, shape, setup, work.row_tokens, usable_gib(offer) * GIB)
    recomputed = planned if checkpointed_layers is None else checkpointed_layers
    step = StepConditions(shape, recipe.method, recomputed / shape.layers, work.span, mb * work.width,
                          setup.lora_targets if recipe.uses_lora else ())
    low, high = gpu_tokens_per_second(gpu, step, setup.impl.fused_loss)
    seconds = train_seconds((work.processed, work.processed), (low, high))
    return dict(planned_gradient_checkpointing=planned > 0, planned_checkpointed_layers=planned,
                planned_micro_batch=mb, fits=fits,
                planned_peak_gib=round(memory.gib, 2), processed_tokens=work.processed, tokens=work.tokens,
                train_seconds_low=round(seconds[0], 1), train_seconds_high=round(seconds[1], 1),
                processed_tokens_per_s=(round(low), round(high)), width=work.width,
                attention_span=round(work.span, 1))


def run_one(name: str, model: Path, data: Path, work: Path, gpu: str, memory_gib: float, steps_scale: float,
            seconds_left: float) -> dict:
    import yaml

    from cloudtune.planning.memory import ModelShape, TrainSetup, memory_peak
    from cloudtune.planning.models import resolve_model
    from cloudtune.planning.throughput import train_seconds
    from cloudtune.recipe import load_recipe

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_data(name, model, data, steps_scale)))
    recipe = load_recipe(path)
    before = predict(recipe, gpu, memory_gib)
    # the model's own worst case, plus starting Python, loading (and quantising) and saving the model
    expected = before["train_seconds_high"] + RUN_OVERHEAD_SECONDS + (40 if recipe.method == "full" else 0)
    if expected > seconds_left:
        return dict(name=name, ok=False, error=f"skipped: needs about {expected:.0f}s, {seconds_left:.0f}s of "
                                               "--budget-seconds left")
    out = work / f"out-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.time()
    proc = train_cloudtune(path, out)
    wall = time.time() - started
    if proc.returncode != 0:
        return dict(name=name, ok=False, error=(proc.stdout + proc.stderr)[-3000:])
    run = json.loads((out / "run.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gc, fused = run["gradient_checkpointing"], bool(run.get("fused_kernels"))
    replay = batches_trained(recipe, run["steps"])
    # the prediction for what actually ran: the tokens actually computed, the trainer's checkpointing
    # and kernels
    shape = resolve_model(recipe).shape
    layers = run.get("checkpointed_layers", shape.layers if gc else 0)
    setup = TrainSetup.from_recipe(recipe, fused_kernels=fused, autocast=run.get("autocast", "off") != "off")
    actual = predict(recipe, gpu, memory_gib, checkpointed_layers=layers, fused_kernels=fused)
    low, high = actual["processed_tokens_per_s"]
    span = actual["attention_span"] if run.get("attention") == "documents" else round(replay["width"] / 2, 1)
    predicted_low, predicted_high = train_seconds((replay["processed"],) * 2, (low, high))
    predicted_mid = (predicted_low + predicted_high) / 2
    steady = steps[WARMUP_STEPS:]
    steady_seconds = steady[-1]["seconds"] - steps[WARMUP_STEPS - 1]["seconds"]
    steady_share = sum(s["step_tokens"] for s in steady) / max(1, sum(s["step_tokens"] for s in steps))
    processed_per_s = replay["processed"] * steady_share / steady_seconds
    peak_predicted = memory_peak(shape, setup, replay["peak_tokens"], layers).gib
    measured_peak = run["peak_gpu_gib"]
    known = "Llama-2-7B" if _same_shape(shape, _llama2_7b()) else "custom"
    return dict(
        name=name, ok=True, device=run["device"], gpu=gpu, method=recipe.method,
        shape=ModelShape.from_config(json.loads((model / "config.json").read_text())).__dict__,
        lora_r=recipe.lora.r, lora_targets=list(setup.lora_targets), lora_dropout=recipe.lora.dropout,
        optimizer=recipe.training.optimizer, micro_batch_size=recipe.training.micro_batch_size,
        max_seq_len=recipe.training.max_seq_len, packing=recipe.training.packing, steps=run["steps"],
        tokens=run["tokens"], processed_tokens=replay["processed"], peak_tokens=replay["peak_tokens"],
        planned_processed_tokens=round(before["processed_tokens"]),  # the padding model, before the run
        gradient_checkpointing=gc, checkpointed_layers=layers,
        planned_gradient_checkpointing=before["planned_gradient_checkpointing"],
        planned_checkpointed_layers=before["planned_checkpointed_layers"],
        fused_kernels=fused, autocast=run.get("autocast", "off"),
        peak_gib=measured_peak, predicted_peak_gib=round(peak_predicted, 2),
        peak_error=round(peak_predicted / measured_peak - 1, 3) if measured_peak else None,
        train_seconds=run["train_seconds"], predicted_train_seconds=[round(predicted_low, 1), round(predicted_high, 1)],
        train_time_error=round(predicted_mid / run["train_seconds"] - 1, 3),
        within_range=predicted_low <= run["train_seconds"] <= predicted_high,
        tokens_per_s=run["tokens_per_s"], steady_processed_tokens_per_s=round(processed_per_s, 1),
        planner_train_seconds=[before["train_seconds_low"], before["train_seconds_high"]],
        wall_seconds=round(wall, 1), versions=run["versions"],
        calibration=dict(source=f"bench/results/cost_accuracy.jsonl: {name} ({run['steps']} steps, "
                                f"steady state after {WARMUP_STEPS})",
                         stack="cloudtune", gpu=gpu, model=known,
                         shape=shape.__dict__, method=recipe.method, gradient_checkpointing=gc,
                         checkpointed_layers=layers, fused_kernels=fused, autocast=run.get("autocast", "off"),
                         width=round(replay["width"], 1), attention_span=span,
                         micro_batch_tokens=round(recipe.training.micro_batch_size * replay["width"], 1),
                         lora_targets=list(setup.lora_targets) if recipe.uses_lora else [],
                         tokens_per_s=round(processed_per_s, 1)))


def _same_shape(a, b) -> bool:
    """Equal shapes, whether or not a config spells out the default head_dim."""
    from dataclasses import replace

    return replace(a, head_dim=a.head_size) == replace(b, head_dim=b.head_size)


def _llama2_7b():
    from cloudtune.planning.models import KNOWN_MODELS

    return KNOWN_MODELS["Llama-2-7B"][1]


def make_model_in_child(path: Path, shape: str) -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from common import make_model; "
            "make_model(Path(sys.argv[2]), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(path), shape], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also append the JSON lines here (e.g. the device's $OUT)")
    parser.add_argument("--recipes", default=DEFAULT, help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every recipe's step count")
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES), help="mini: a CPU plumbing check")
    parser.add_argument("--assume-gpu", help="predict for this GPU when there is none (plumbing checks)")
    parser.add_argument("--budget-seconds", type=float, default=450,
                        help="skip a recipe the cost model says would not finish in what is left of this")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ct-cost-accuracy")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        os.environ["OUT"] = str(args.out)  # bench/common.record appends there too
    from cloudtune.planning.gpus import SPECS, canonical_gpu

    found = device_gpu()
    if found:
        gpu, memory = canonical_gpu(found[0]) or found[0], found[1]
    elif args.assume_gpu:
        gpu, memory = canonical_gpu(args.assume_gpu), SPECS[canonical_gpu(args.assume_gpu)].memory_gib
    else:
        parser.error("no NVIDIA GPU here; pass --assume-gpu H100 --shape mini to check the plumbing on a CPU")
    if gpu not in SPECS:
        parser.error(f"no spec for GPU '{gpu}' in cloudtune/planning/gpus.py")
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    model = args.work / f"llama-{args.shape}"
    if not (model / "config.json").exists():
        make_model_in_child(model, args.shape)
    data = write_dataset(args.work / "guanaco-like.jsonl", n=4000)
    results = []
    for name in args.recipes.split(","):
        method = RECIPES[name][0]
        if method in ("qlora", "8bit") and not HAVE_BNB:
            row = dict(name=name, ok=False, error="bitsandbytes is not installed here")
        else:
            row = run_one(name, model, data, args.work, gpu, memory, args.steps_scale,
                          args.budget_seconds - (time.time() - began))
        results.append(row)
        record("cost_accuracy", row)
    print(f"\n{'recipe':<16}{'ckpt plan/ran':>14}{'peak GiB pred/meas':>21}{'train s pred (range)':>26}"
          f"{'meas':>8}{'err':>7}")
    for row in results:
        if not row["ok"]:
            print(f"{row['name']:<16}  {row['error'][-200:]}")
            continue
        plan = "/".join("on" if row[k] else "off" for k in ("planned_gradient_checkpointing", "gradient_checkpointing"))
        peak = f"{row['predicted_peak_gib']:.1f}/{row['peak_gib'] or 0:.1f}"
        low, high = row["predicted_train_seconds"]
        print(f"{row['name']:<16}{plan:>14}{peak:>21}{f'{(low + high) / 2:.0f} ({low:.0f}–{high:.0f})':>26}"
              f"{row['train_seconds']:>8.0f}{row['train_time_error']:>+7.0%}")
    print(f"total {time.time() - began:.0f}s on {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
