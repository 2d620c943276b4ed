"""Reload saved outputs the way a user would and check they reproduce the trained model's logits.

`python -m cloudtune.train.verify OUTPUT_DIR` prints the largest logit difference and exits 1 on a mismatch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TOLERANCE = 1e-4


def reload(out: Path, base_source: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = json.loads((out / "run.json").read_text())
    if run["weights_dir"] == "adapter":
        base = AutoModelForCausalLM.from_pretrained(base_source, dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(out / "adapter"))
    return AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)


def max_logit_difference(out: Path, base_source: str) -> float:
    from safetensors.torch import load_file

    probe = load_file(str(out / "probe.safetensors"))
    model = reload(out, base_source).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    return float((logits - probe["logits"]).abs().max())


def main(argv: list[str]) -> int:
    from ..recipe import Recipe
    from .model import model_source

    out = Path(argv[0])
    run = json.loads((out / "run.json").read_text())
    model = run["model"]
    spec = {"init": model.split(":", 1)[1]} if model.startswith("init:") else {"name": model}
    recipe = Recipe.model_validate({"model": spec, "dataset": {"hub": "unused"}})
    diff = max_logit_difference(out, model_source(recipe))
    ok = diff <= TOLERANCE
    print(f"reloaded {out / run['weights_dir']}: max |logit difference| = {diff:.2e} "
          f"({'matches' if ok else 'MISMATCH'} the end of training)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
