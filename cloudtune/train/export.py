"""After training: save the adapter (or model), a logits probe, samples, merge, push, run.json, manifest."""
from __future__ import annotations

import gc
import json
import os
import platform
from pathlib import Path

import torch

from .. import __version__, formats
from ..manifest import write_manifest
from ..recipe import Recipe
from . import model as model_lib
from .data import Encoded, chat_renderer

PROBE_TOKENS = 64


def finish(recipe: Recipe, model, tokenizer, out: Path, *, device, encoded: Encoded, state, train_seconds: float,
           wall_seconds: float, final_loss: float, gradient_checkpointing: bool, trainable: int) -> dict:
    model.eval()
    weights_dir = out / ("adapter" if recipe.uses_lora else "model")
    model.save_pretrained(weights_dir)
    tokenizer.save_pretrained(weights_dir)
    save_probe(model, encoded, out, device)
    if recipe.outputs.samples:
        write_samples(recipe, model, tokenizer, encoded.format, out, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model
    gc.collect()
    if recipe.outputs.merge and recipe.uses_lora:
        merge(recipe, weights_dir, out / "merged", device)
    summary = {
        "cloudtune": __version__,
        "recipe_hash": recipe.fingerprint(),
        "name": recipe.run_name,
        "method": recipe.method,
        "model": recipe.model.name or f"init:{recipe.model.init}",
        "weights_dir": weights_dir.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "gpu_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "image_digest": os.environ.get("CLOUDTUNE_IMAGE_DIGEST"),
        "versions": _versions(),
        "rows": encoded.rows,
        "truncated_rows": encoded.truncated,
        "steps": state.step,
        "tokens": state.tokens,
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
        "tokens_per_s": round(state.tokens / train_seconds, 1) if train_seconds else 0.0,
        "final_loss": final_loss,
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "gradient_checkpointing": gradient_checkpointing,
        "trainable_params": trainable,
    }
    (out / "run.json").write_text(json.dumps(summary, indent=1))
    if recipe.outputs.push_to_hub:
        push(recipe, out)
    write_manifest(out)
    return summary


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def save_probe(model, encoded: Encoded, out: Path, device) -> None:
    """Logits on a fixed input, so anyone can check that the saved weights reproduce the trained model."""
    from safetensors.torch import save_file

    ids = torch.tensor([encoded.examples[0][0][:PROBE_TOKENS]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    save_file({"input_ids": ids.cpu(), "logits": logits.contiguous()}, str(out / "probe.safetensors"))


def sample_prompt(fmt: str, text: str, tokenizer) -> str:
    if fmt == "chat":
        return chat_renderer(tokenizer)([{"role": "user", "content": text}], True)
    if fmt == "alpaca":
        prompt, _ = formats.render({"instruction": text, "output": "-"}, "alpaca", formats.ColumnMap(),
                                   formats.fallback_chat)
        return prompt
    if fmt == "llama2-inst":
        return f"[INST] {text} [/INST] "
    return text


def write_samples(recipe: Recipe, model, tokenizer, fmt: str, out: Path, device) -> None:
    """Generate from the trained model and, for LoRA, from the base beside it (adapter switched off)."""
    model.config.use_cache = True
    rows = []
    for text in recipe.outputs.samples:
        prompt = sample_prompt(fmt, text, tokenizer)
        row = {"prompt": text, "tuned": _generate(model, tokenizer, prompt, recipe, device), "base": None}
        if recipe.uses_lora:
            with model.disable_adapter():
                row["base"] = _generate(model, tokenizer, prompt, recipe, device)
        rows.append(row)
    model.config.use_cache = False
    with (out / "samples.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _generate(model, tokenizer, prompt: str, recipe: Recipe, device) -> str:
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += tokenizer(prompt, add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([ids], device=device)
    with torch.no_grad():
        generated = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                   max_new_tokens=recipe.outputs.sample_max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)


def merge(recipe: Recipe, adapter_dir: Path, merged_dir: Path, device) -> None:
    """Merge into an unquantised copy of the base, saved in the base's compute dtype.

    Merging into a 4-bit base would bake rounding errors in; reloading the base unquantised is exact.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_lib.model_source(recipe), dtype=model_lib.compute_dtype(device),
                                                revision=recipe.model.revision,
                                                trust_remote_code=recipe.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    model_lib.load_tokenizer(recipe).save_pretrained(merged_dir)


def push(recipe: Recipe, out: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN"))
    repo = recipe.outputs.push_to_hub
    api.create_repo(repo, private=True, exist_ok=True)
    weights = out / ("adapter" if recipe.uses_lora else "model")
    api.upload_folder(repo_id=repo, folder_path=str(weights), commit_message=f"cloudtune {recipe.run_name}")
    if (out / "merged").is_dir():
        api.upload_folder(repo_id=repo, folder_path=str(out / "merged"), path_in_repo="merged")
    print(f"pushed to hub: {repo}", flush=True)
