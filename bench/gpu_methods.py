"""Every method on a GPU: qlora, 8bit, lora, full train a few steps of a Llama-2-7B-shaped model.

  python bench/gpu_methods.py [--methods qlora,8bit,lora,full,qlora-fp16] [--steps 8]

For each: loss finite, weights saved, and reloaded the way a user would (cloudtune.train.verify: base
loaded again with the same quantisation, then the adapter) giving the logits recorded at the end of
training within bf16 rounding; the base without the adapter is reported beside it for scale. A
`-fp16` suffix trains with `training.precision: fp16`, the path of GPUs without bf16 (T4, V100),
rehearsed on this one. Appends JSON lines to bench/results/gpu_methods.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, make_model, record, train_cloudtune, write_dataset  # noqa: E402

sys.path.insert(0, str(REPO))


def recipe_for(name: str, model: Path, data: Path, steps: int) -> dict:
    method, _, precision = name.partition("-")
    training = dict(max_steps=steps, learning_rate=1e-3, warmup_ratio=0.0, micro_batch_size=2, max_seq_len=2048,
                    gradient_checkpointing="on", precision=precision or "auto")
    recipe = dict(name=f"gpu-{name}", model=dict(name=str(model)), method=method,
                  dataset=dict(path=str(data), format="completion"), training=training)
    if method == "full":
        training.update(optimizer="adamw_8bit", gradient_checkpointing="on", micro_batch_size=1)
    else:
        recipe["lora"] = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    return recipe


def reload_check(out: Path, model: Path) -> dict:
    """Reload as a user would (cloudtune.train.verify) and compare with the end-of-training logits."""
    import torch

    from cloudtune.train.verify import logit_differences, tolerance

    difference, scale, base_difference = logit_differences(out, str(model))
    torch.cuda.empty_cache()  # the next method's training process needs the whole GPU
    return dict(reload_max_logit_diff=round(difference, 4), logit_scale=round(scale, 2),
                base_max_logit_diff=None if base_difference is None else round(base_difference, 4),
                reload_ok=difference <= tolerance(scale, out))


def methods_setup(methods: str, shape: str, work: str, rows: int):
    """(args, model, data) of a script that trains some methods a few steps: its options, the random model
    of --shape and the dataset, written once into --work."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=methods)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shape", default=shape, help="model shape: 7b (the benchmark), 1b, mini (smoke test)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / work)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / f"llama-{args.shape}", args.shape)
    return args, model, write_dataset(args.work / "data.jsonl", n=rows)


def main() -> int:
    import yaml

    args, model, data = methods_setup("qlora,8bit,lora,full", "7b", "ct-methods", rows=600)
    for method in args.methods.split(","):
        recipe_path = args.work / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe_for(method, model, data, args.steps)))
        out = args.work / f"out-{method}"
        started = time.time()
        proc = train_cloudtune(recipe_path, out)
        if proc.returncode != 0:
            record("gpu_methods", dict(method=method, ok=False, error=(proc.stdout + proc.stderr)[-2500:]))
            continue
        run = json.loads((out / "run.json").read_text())
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        check = reload_check(out, model)
        ok = all(math.isfinite(x) for x in losses) and check["reload_ok"]
        record("gpu_methods", dict(method=method, ok=ok, steps=run["steps"], first_loss=losses[0],
                                   last_loss=losses[-1], **check,
                                   peak_gpu_gib=run["peak_gpu_gib"], tokens_per_s=run["tokens_per_s"],
                                   gradient_checkpointing=run["gradient_checkpointing"],
                                   trainable_params=run["trainable_params"], device=run["device"],
                                   autocast=run.get("autocast"),
                                   wall_seconds=round(time.time() - started, 1), versions=run["versions"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
