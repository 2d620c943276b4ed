"""The trainer's FSDP2 path on ONE GPU, against the same recipe's plain run: what only a GPU can show.

  python bench/fsdp_one_gpu.py [--methods qlora,lora,full] [--shape 1b] [--steps 8]

The multi-GPU kinds of the device are not lent, so this runs the real trainer with its FSDP path forced
at world size 1: a one-rank NCCL process group, `fully_shard` on every decoder layer and the root, the
checkpoint and the gathered, unsharded copy that is saved. What the CPU tests (gloo) cannot reach runs
here: bitsandbytes' 4-bit weights stored in bf16 (`bnb_4bit_quant_storage`) and sharded as DTensors, NCCL,
FSDP's CUDA streams. Per method: the per-step losses of the FSDP run against the plain run, and the saved
weights reloaded as a user would (cloudtune.train.verify). Not a scaling measurement: one rank shards
nothing away. Appends JSON lines to bench/results/fsdp_one_gpu.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, record, train_cloudtune  # noqa: E402
from gpu_methods import methods_setup, recipe_for, reload_check  # noqa: E402

sys.path.insert(0, str(REPO))


def as_one_rank_fsdp(argv: list[str]) -> int:
    """`python -m cloudtune.train` in this process as rank 0 of a world of 1 that takes the distributed path."""
    from cloudtune.train import distributed
    from cloudtune.train.__main__ import main

    distributed.World.distributed = property(lambda _world: True)
    return main(argv)


def train_fsdp(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.run([sys.executable, __file__, "--as-rank", str(recipe), "--out", str(out)], env=env,
                          capture_output=True, text=True)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    import yaml

    if sys.argv[1:2] == ["--as-rank"]:
        return as_one_rank_fsdp(sys.argv[2:])
    args, model, data = methods_setup("qlora,lora,full", "1b", "ct-fsdp", rows=400)
    for method in args.methods.split(","):
        row: dict = dict(method=method, shape=args.shape, steps=args.steps)
        for parallelism, train in (("none", train_cloudtune), ("fsdp", train_fsdp)):
            recipe = recipe_for(method, model, data, args.steps)
            # bitsandbytes' 8-bit optimizers cannot step FSDP's DTensors (measured here): both runs take AdamW
            recipe["training"].update(parallelism="fsdp" if parallelism == "fsdp" else "auto", optimizer="adamw")
            recipe_path = args.work / f"{method}-{parallelism}.yaml"
            recipe_path.write_text(yaml.safe_dump(recipe))
            out = args.work / f"out-{method}-{parallelism}"
            started = time.time()
            done = train(recipe_path, out)
            if done.returncode != 0:
                row[parallelism] = dict(ok=False, error=(done.stdout + done.stderr)[-2500:])
                continue
            run = json.loads((out / "run.json").read_text())
            row[parallelism] = dict(ok=True, parallelism=run.get("parallelism"), losses=losses(out),
                                    peak_gpu_gib=run["peak_gpu_gib"], tokens_per_s=run["tokens_per_s"],
                                    wall_seconds=round(time.time() - started, 1), **reload_check(out, model))
        plain, sharded = row.get("none", {}), row.get("fsdp", {})
        if plain.get("ok") and sharded.get("ok"):
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(plain["losses"], sharded["losses"], strict=True))
            row["ok"] = (sharded["reload_ok"] and all(math.isfinite(x) for x in sharded["losses"])
                         and row["max_loss_diff"] <= 0.02 * max(abs(x) for x in plain["losses"]))
        else:
            row["ok"] = False
        record("fsdp_one_gpu", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
