"""Reload saved outputs the way a user would and check they reproduce the trained model's logits.

`python -m cloudtune.train.verify OUTPUT_DIR` rebuilds the model as training had it (same device,
dtype and quantisation, then the saved adapter or weights), prints the largest logit difference
from the probe taken at the end of training, and exits 1 on a mismatch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TOLERANCE = 1e-4  # fp32 on one machine reproduces to rounding
# bf16/fp16 logits: a few units in the last place of the largest logit (bf16 carries 8 significant bits).
LOW_PRECISION_RELATIVE = 1e-2


def reload(out: Path, base_source: str, device: torch.device | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..recipe import Recipe
    from .loop import pick_device
    from .model import apply_fused_kernels, compute_dtype, load_base

    device = device or pick_device()
    run = json.loads((out / "run.json").read_text())
    # The same kernels as in training: Liger's norms and RoPE round differently from the eager ones.
    training = {"attention": run.get("attention", "auto"), "fused_kernels": "on" if run.get("fused_kernels") else "off"}
    recipe = Recipe.model_validate({"model": {"name": base_source}, "method": run["method"], "training": training,
                                    "dataset": {"hub": "unused"}})
    if run["weights_dir"] == "model":
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=compute_dtype(device)).to(device)
        apply_fused_kernels(recipe, model, device)
        return model
    base = load_base(recipe, device)
    apply_fused_kernels(recipe, base, device)
    return PeftModel.from_pretrained(base, str(out / "adapter"))


def logit_differences(out: Path, base_source: str) -> tuple[float, float, float | None]:
    """(max |reloaded - probe|, max |probe|, max |base without adapter - probe| or None)."""
    from safetensors.torch import load_file

    from .model import mixed_precision

    probe = load_file(str(out / "probe.safetensors"))
    model = reload(out, base_source).eval()
    ids = probe["input_ids"].to(model.device)
    with torch.no_grad(), mixed_precision(model.device):
        logits = model(input_ids=ids).logits.float().cpu()
        base_diff = None
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base_diff = float((model(input_ids=ids).logits.float().cpu() - probe["logits"]).abs().max())
    return float((logits - probe["logits"]).abs().max()), float(probe["logits"].abs().max()), base_diff


def max_logit_difference(out: Path, base_source: str) -> float:
    return logit_differences(out, base_source)[0]


def tolerance(scale: float) -> float:
    low_precision = torch.cuda.is_available()  # the trainer computes in bf16/fp16 on a GPU, fp32 on a CPU
    return max(TOLERANCE, LOW_PRECISION_RELATIVE * scale) if low_precision else TOLERANCE


def main(argv: list[str]) -> int:
    from ..recipe import Recipe
    from .__main__ import quiet_libraries
    from .model import model_source

    quiet_libraries()
    out = Path(argv[0])
    run = json.loads((out / "run.json").read_text())
    model = run["model"]
    spec = {"init": model.split(":", 1)[1]} if model.startswith("init:") else {"name": model}
    recipe = Recipe.model_validate({"model": spec, "dataset": {"hub": "unused"}})
    diff, scale, base_diff = logit_differences(out, model_source(recipe))
    ok = diff <= tolerance(scale)
    against_base = f"; the base without the adapter differs by {base_diff:.2e}" if base_diff is not None else ""
    print(f"reloaded {out / run['weights_dir']}: max |logit difference| = {diff:.2e} of logits up to {scale:.1f} "
          f"({'matches' if ok else 'MISMATCH'} the end of training){against_base}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
