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


# run.json's autocast dtype -> the training.precision that reproduces it
PRECISION_OF_AUTOCAST = {"bfloat16": "bf16", "float16": "fp16"}


def run_recipe(out: Path, base_source: str, method: str | None = None):
    """The settings a finished run trained with, as far as they change its logits: the same kernels
    (Liger's norms and RoPE round differently from the eager ones) and the same precision; `method`
    puts the adapter on another base (lora: the 16-bit one)."""
    from ..recipe import Recipe

    run = json.loads((out / "run.json").read_text())
    training = {"attention": run.get("attention", "auto"), "fused_kernels": "on" if run.get("fused_kernels") else "off",
                "precision": PRECISION_OF_AUTOCAST.get(run.get("autocast"), "auto")}
    recipe = Recipe.model_validate({"model": {"name": base_source}, "method": method or run["method"],
                                    "training": training,
                                    "dataset": {"hub": "unused"}})
    return recipe, run["weights_dir"]


def reload(out: Path, base_source: str, device: torch.device | None = None, method: str | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .distributed import pick_device
    from .model import apply_fused_kernels, choose_precision, load_base

    device = device or pick_device()
    recipe, weights_dir = run_recipe(out, base_source, method)
    if weights_dir == "model":
        dtype = choose_precision(recipe, device).weights
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=dtype).to(device)
        apply_fused_kernels(recipe, model, device)
        return model
    base = load_base(recipe, device)
    apply_fused_kernels(recipe, base, device)
    return PeftModel.from_pretrained(base, str(out / "adapter"))


def reloaded_with_probe(out: Path, base_source: str, method: str | None = None):
    """(the probe taken at the end of training, the reloaded model in eval mode, the precision it ran in)."""
    from safetensors.torch import load_file

    from .model import choose_precision

    probe = load_file(str(out / "probe.safetensors"))
    model = reload(out, base_source, method=method).eval()
    return probe, model, choose_precision(run_recipe(out, base_source, method)[0], model.device)


def logit_differences(out: Path, base_source: str) -> tuple[float, float, float | None]:
    """(max |reloaded - probe|, max |probe|, max |base without adapter - probe| or None)."""
    from .model import mixed_precision

    probe, model, precision = reloaded_with_probe(out, base_source)
    ids = probe["input_ids"].to(model.device)
    with torch.no_grad(), mixed_precision(precision, model.device):
        logits = model(input_ids=ids).logits.float().cpu()
        base_diff = None
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base_diff = float((model(input_ids=ids).logits.float().cpu() - probe["logits"]).abs().max())
    return float((logits - probe["logits"]).abs().max()), float(probe["logits"].abs().max()), base_diff


def sixteen_bit_base_difference(out: Path, base_source: str) -> float | None:
    """For an fp8 run: max |logit difference| between the adapter on the 16-bit base and the probe (the
    adapter on the fp8 base it trained on); None for other methods, whose reload already is the base."""
    from .model import mixed_precision

    if json.loads((out / "run.json").read_text())["method"] != "fp8":
        return None
    probe, model, precision = reloaded_with_probe(out, base_source, method="lora")
    with torch.no_grad(), mixed_precision(precision, model.device):
        logits = model(input_ids=probe["input_ids"].to(model.device)).logits.float().cpu()
    return float((logits - probe["logits"]).abs().max())


def max_logit_difference(out: Path, base_source: str) -> float:
    return logit_differences(out, base_source)[0]


def tolerance(scale: float, out: Path) -> float:
    """How far reloaded logits may stray from the probe: rounding, in the precision the run computed in
    (16-bit weights on a GPU, or autocast to 16 bits anywhere; fp32 on a CPU otherwise)."""
    recipe, _ = run_recipe(out, "unused")
    low_precision = torch.cuda.is_available() or recipe.training.precision != "auto"
    return max(TOLERANCE, LOW_PRECISION_RELATIVE * scale) if low_precision else TOLERANCE


def main(argv: list[str]) -> int:
    import argparse

    from ..errors import CloudtuneError
    from ..recipe import Recipe
    from .__main__ import quiet_libraries
    from .model import model_source

    parser = argparse.ArgumentParser(prog="python -m cloudtune.train.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="a run's output folder (outputs/<name>/<run id>)")
    out = parser.parse_args(argv).output_dir
    if not (out / "run.json").is_file():
        raise CloudtuneError(f"{out} is not the output folder of a run: it has no run.json.",
                             "Give the folder the receipt names under `outputs` (outputs/<recipe name>/<run id>).")
    quiet_libraries()
    run = json.loads((out / "run.json").read_text())
    model = run["model"]
    spec = {"init": model.split(":", 1)[1]} if model.startswith("init:") else {"name": model}
    recipe = Recipe.model_validate({"model": spec, "dataset": {"hub": "unused"}})
    diff, scale, base_diff = logit_differences(out, model_source(recipe))
    ok = diff <= tolerance(scale, out)
    against_base = f"; the base without the adapter differs by {base_diff:.2e}" if base_diff is not None else ""
    print(f"reloaded {out / run['weights_dir']}: max |logit difference| = {diff:.2e} of logits up to {scale:.1f} "
          f"({'matches' if ok else 'MISMATCH'} the end of training){against_base}")
    sixteen_bit = sixteen_bit_base_difference(out, model_source(recipe))
    if sixteen_bit is not None:  # what serving the adapter on the original base changes: FP8's rounding
        print(f"on the 16-bit base (where a served adapter usually runs) the logits differ from the fp8 base's "
              f"by up to {sixteen_bit:.2e} ({sixteen_bit / scale:.1%} of the largest)")
    return 0 if ok else 1


if __name__ == "__main__":
    from ..errors import entry_point

    sys.exit(entry_point(main))
