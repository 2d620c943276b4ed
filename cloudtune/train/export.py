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


def finish(recipe: Recipe, model, tokenizer, out: Path, *, device, encoded: Encoded, state, wall_seconds: float,
           epochs: float, final_loss: float, checkpointed_layers: int, fused_kernels: bool, trainable: int,
           base_samples: list[str], budget_stop: dict | None = None, evaluation: dict | None = None,
           world=None, parallelism: str = "none") -> dict:
    model.eval()
    weights_dir = out / ("adapter" if recipe.uses_lora else "model")
    model.save_pretrained(weights_dir)
    tokenizer.save_pretrained(weights_dir)
    precision = model_lib.choose_precision(recipe, device)
    save_probe(model, encoded, out, device, precision)
    if recipe.outputs.samples:
        tuned = generate_samples(recipe, model, tokenizer, encoded.format, device)
        with (out / "samples.jsonl").open("w") as handle:
            for prompt, after, before in zip(recipe.outputs.samples, tuned, base_samples, strict=True):
                handle.write(json.dumps({"prompt": prompt, "tuned": after, "base": before}) + "\n")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    gc.collect()
    merged = merge(recipe, weights_dir, out / "merged") if recipe.outputs.merge and recipe.uses_lora else None
    gguf_written = gguf_files(recipe, model, tokenizer, weights_dir, out, merged)
    summary = {
        "cloudtune": __version__,
        "recipe_hash": recipe.fingerprint(),
        "name": recipe.run_name,
        "method": recipe.method,
        "model": recipe.model.name or f"init:{recipe.model.init}",
        "weights_dir": weights_dir.name,
        "merged_dir": "merged" if (out / "merged").is_dir() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "gpu_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "image_digest": os.environ.get("CLOUDTUNE_IMAGE_DIGEST"),
        "versions": _versions(),
        "format": encoded.format,
        "rows": encoded.rows,
        "truncated_rows": encoded.truncated,
        "steps": state.step,
        "epochs": round(epochs, 3),
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
        "tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else 0.0,
        **scale_out(state, world, parallelism),
        "final_loss": final_loss,
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "gradient_checkpointing": checkpointed_layers > 0,
        "checkpointed_layers": checkpointed_layers,
        "fused_kernels": fused_kernels,
        "autocast": precision.name,
        "attention": model.config._attn_implementation,
        "trainable_params": trainable,
        "budget_stop": budget_stop,  # set when max_cost ended the training before its last step
        "eval": evaluation,  # the eval loss, its best step and which weights were kept (dataset.eval)
        "gguf": gguf_written,
    }
    if recipe.outputs.push_to_hub:
        summary["push_to_hub"] = push(recipe, out)
    (out / "run.json").write_text(json.dumps(summary, indent=1))
    (out / "recipe.yaml").write_text(recipe.to_yaml())  # what was trained, for the report and for re-runs
    write_manifest(out)
    return summary


def scale_out(state, world, parallelism: str) -> dict:
    """How many processes trained, on how many machines, and the speed of each GPU (or CPU process) in them."""
    size = world.size if world else 1
    return {"world_size": size, "nodes": world.nodes if world else 1, "parallelism": parallelism,
            "tokens_per_s_per_gpu": round(state.tokens / state.train_seconds / size, 1) if state.train_seconds
            else 0.0}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def save_probe(model, encoded: Encoded, out: Path, device, precision: model_lib.Precision) -> None:
    """Logits on a fixed input, so anyone can check that the saved weights reproduce the trained model."""
    from safetensors.torch import save_file

    ids = torch.tensor([encoded.examples[0][0][:PROBE_TOKENS]], device=device)
    with torch.no_grad(), model_lib.mixed_precision(precision, device):
        logits = model(input_ids=ids).logits.float().cpu()
    save_file({"input_ids": ids.cpu(), "logits": logits.contiguous()}, str(out / "probe.safetensors"))


def generate_samples(recipe: Recipe, model, tokenizer, fmt: str, device) -> list[str]:
    """Greedy generations for outputs.samples, each prompt rendered the way the training data was."""
    if not recipe.outputs.samples:
        return []
    was_training = model.training
    model.eval()
    chat = chat_renderer(tokenizer)
    texts = [_generate(model, tokenizer, formats.prompt_only(fmt, prompt, chat), recipe, device)
             for prompt in recipe.outputs.samples]
    model.train(was_training)
    return texts


def _generate(model, tokenizer, prompt: str, recipe: Recipe, device) -> str:
    from .inference import generate

    return generate(model, tokenizer, prompt, max_new_tokens=recipe.outputs.sample_max_new_tokens,
                    autocast=model_lib.mixed_precision(model_lib.choose_precision(recipe, device), device))


def merge(recipe: Recipe, adapter_dir: Path, merged_dir: Path):
    """Save the base with the adapter merged in (model_lib.load_merged says how); returns the merged model."""
    merged = model_lib.load_merged(recipe.model, adapter_dir)
    merged.save_pretrained(merged_dir)
    model_lib.load_tokenizer(recipe).save_pretrained(merged_dir)
    return merged


def gguf_files(recipe: Recipe, model, tokenizer, weights_dir: Path, out: Path, merged=None) -> list[dict] | None:
    """outputs.gguf: the merged model (or the fully trained one) and the adapter alone, each read back and checked."""
    if not recipe.outputs.gguf:
        return None
    from . import gguf

    def merged_model() -> tuple:
        if not recipe.uses_lora:
            return model, tokenizer
        return (merged if merged is not None else model_lib.load_merged(recipe.model, weights_dir)), tokenizer

    return gguf.export_all(out, list(recipe.outputs.gguf), recipe.run_name, merged_model,
                           weights_dir if recipe.uses_lora else None, model_lib.load_config(recipe))


def push(recipe: Recipe, out: Path) -> dict:
    """Upload the adapter (and merged model); a failure is reported, not raised, so the outputs still come home."""
    from huggingface_hub import HfApi

    repo = recipe.outputs.push_to_hub
    try:
        api = HfApi(token=os.environ.get("HF_TOKEN"))
        api.create_repo(repo, private=True, exist_ok=True)
        weights = out / ("adapter" if recipe.uses_lora else "model")
        api.upload_folder(repo_id=repo, folder_path=str(weights), commit_message=f"cloudtune {recipe.run_name}")
        if (out / "merged").is_dir():
            api.upload_folder(repo_id=repo, folder_path=str(out / "merged"), path_in_repo="merged")
    except Exception as exc:  # noqa: BLE001 - network, permissions, quota: the run's outputs matter more
        print(f"warning: push to hub {repo} failed: {type(exc).__name__}: {exc}", flush=True)
        return {"repo": repo, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print(f"pushed to hub: {repo}", flush=True)
    return {"repo": repo, "ok": True}
