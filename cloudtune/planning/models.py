"""A recipe's model shape, found without the network: the planner needs layers and widths, not weights.

Where it looks, in order: the tiny demo model; a local model directory's config.json; the local
Hugging Face cache; a table of common Llama-class models by hub id; a `model.params` size in the
recipe (then a Llama-like shape of that size is assumed, and the plan says so).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CloudtuneError
from ..inputs import model_config_problem
from ..recipe import parse_params
from ..tiny import TINY_LLAMA, VOCAB_SIZE
from .memory import ModelShape


def _shape(h, i, layers, heads, kv, vocab, head_dim=None, tied=False) -> ModelShape:
    return ModelShape(hidden=h, intermediate=i, layers=layers, heads=heads, kv_heads=kv, vocab=vocab,
                      head_dim=head_dim, tied_embeddings=tied)


# From each model's config.json on the hub. Keys are matched against the repo name (any owner, any
# suffix such as -hf, -chat, -Instruct), so mirrors and fine-tunes of the same base resolve too.
KNOWN_MODELS: dict[str, tuple[str, ModelShape]] = {
    "Llama-2-7B": (r"llama-2-7b", _shape(4096, 11008, 32, 32, 32, 32000)),
    "Llama-2-13B": (r"llama-2-13b", _shape(5120, 13824, 40, 40, 40, 32000)),
    "Llama-2-70B": (r"llama-2-70b", _shape(8192, 28672, 80, 64, 8, 32000)),
    "Llama-3-8B": (r"llama-3(\.[13])?-8b", _shape(4096, 14336, 32, 32, 8, 128256)),
    "Llama-3-70B": (r"llama-3(\.[13])?-70b", _shape(8192, 28672, 80, 64, 8, 128256)),
    "Llama-3.2-1B": (r"llama-3\.2-1b", _shape(2048, 8192, 16, 32, 8, 128256, tied=True)),
    "Llama-3.2-3B": (r"llama-3\.2-3b", _shape(3072, 8192, 28, 24, 8, 128256, tied=True)),
    "Mistral-7B-v0.3": (r"mistral-7b(-instruct)?-v0\.3", _shape(4096, 14336, 32, 32, 8, 32768)),
    "Mistral-7B": (r"mistral-7b", _shape(4096, 14336, 32, 32, 8, 32000)),
    "Qwen2.5-0.5B": (r"qwen2\.5-0\.5b", _shape(896, 4864, 24, 14, 2, 151936, tied=True)),
    "Qwen2.5-1.5B": (r"qwen2\.5-1\.5b", _shape(1536, 8960, 28, 12, 2, 151936, tied=True)),
    "Qwen2.5-3B": (r"qwen2\.5-3b", _shape(2048, 11008, 36, 16, 2, 151936, tied=True)),
    "Qwen2.5-7B": (r"qwen2\.5-7b", _shape(3584, 18944, 28, 28, 4, 152064)),
    "Qwen2.5-14B": (r"qwen2\.5-14b", _shape(5120, 13824, 48, 40, 8, 152064)),
    "Qwen2.5-32B": (r"qwen2\.5-32b", _shape(5120, 27648, 64, 40, 8, 152064)),
    "Qwen2.5-72B": (r"qwen2\.5-72b", _shape(8192, 29568, 80, 64, 8, 152064)),
    "Gemma-2-2B": (r"gemma-2-2b", _shape(2304, 9216, 26, 8, 4, 256000, head_dim=256, tied=True)),
    "Gemma-2-9B": (r"gemma-2-9b", _shape(3584, 14336, 42, 16, 8, 256000, head_dim=256, tied=True)),
    "Gemma-2-27B": (r"gemma-2-27b", _shape(4608, 36864, 46, 32, 16, 256000, head_dim=128, tied=True)),
    "TinyLlama-1.1B": (r"tinyllama-1\.1b", _shape(2048, 5632, 22, 32, 4, 32000)),
}


@dataclass(frozen=True)
class ModelInfo:
    shape: ModelShape
    source: str  # where the shape came from, shown with the plan
    exact: bool  # False when only a parameter count was known

    @property
    def download_bytes(self) -> float:
        """bf16 safetensors on the hub: two bytes per parameter."""
        return self.shape.params * 2.0


def resolve_model(recipe) -> ModelInfo:
    spec = recipe.model
    if spec.init == "tiny-llama":
        return ModelInfo(ModelShape.from_config({**TINY_LLAMA, "vocab_size": VOCAB_SIZE}), "tiny-llama", True)
    name = spec.name
    local = Path(name).expanduser()
    if not local.is_absolute() and recipe.source is not None and (recipe.source.parent / local).exists():
        local = recipe.source.parent / local
    if (local / "config.json").is_file():
        return ModelInfo(_from_config_file(local / "config.json"), f"{local}/config.json", True)
    cached = hf_cache_config(name, spec.revision)
    if cached is not None:
        return ModelInfo(_from_config_file(cached), "config.json in the local Hugging Face cache", True)
    repo = name.rsplit("/", 1)[-1].lower()
    for label, (pattern, shape) in KNOWN_MODELS.items():
        if re.search(pattern, repo):
            return ModelInfo(shape, f"cloudtune's table ({label})", True)
    size = getattr(spec, "params", None)
    if size is not None:
        return _assumed_shape(parse_params(size))
    raise CloudtuneError(
        f"model '{name}': cloudtune cannot tell its size offline (no local directory, nothing in the "
        f"Hugging Face cache, not one of the {len(KNOWN_MODELS)} models it knows).",
        "Point model.name at a local directory with config.json, fetch the config once with "
        f"`huggingface-cli download {name} config.json`, or state the size in the recipe "
        "(model: {name: ..., params: 8B}) to price it as a Llama-like model of that size.")


def hf_cache_config(repo_id: str, revision: str | None = None) -> Path | None:
    """config.json of a hub model already in the local cache (HF_HUB_CACHE / HF_HOME / ~/.cache)."""
    snapshot = hf_cache_snapshot(repo_id, revision, "config.json")
    return snapshot / "config.json" if snapshot else None


def hf_cache_snapshot(repo_id: str, revision: str | None = None, needs: str = "config.json") -> Path | None:
    """The cached snapshot directory of a hub model that holds the file `needs`, if any."""
    if "/" not in repo_id or repo_id.startswith(("/", ".", "~")):
        return None
    root = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
            or os.path.join(os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "huggingface"), "hub"))
    repo = Path(root) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    snapshot = ref.read_text().strip() if ref.is_file() else revision
    candidates = [repo / "snapshots" / snapshot] if snapshot else []
    candidates += sorted((repo / "snapshots").glob("*"))
    return next((path for path in candidates if (path / needs).is_file()), None)


def _from_config_file(path: Path) -> ModelShape:
    problem = model_config_problem(path)  # hostile or broken configs, before anything trusts a size
    if problem:
        raise CloudtuneError(f"{path}: {problem}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CloudtuneError(f"{path}: cannot read the model config ({exc}).") from None
    if config.get("num_local_experts") or config.get("num_experts"):
        raise CloudtuneError(f"{path}: a mixture-of-experts model; cloudtune's cost model covers dense "
                             "Llama-class models only.")
    try:
        return ModelShape.from_config(config)
    except TypeError:
        raise CloudtuneError(f"{path}: not a Llama-class config (hidden_size, intermediate_size, "
                             "num_hidden_layers, num_attention_heads, vocab_size are needed).") from None


def _assumed_shape(params: float) -> ModelInfo:
    """The known model closest in size, its depth scaled so the parameter count matches."""
    label, (_, shape) = min(KNOWN_MODELS.items(), key=lambda item: abs(item[1][1].params / params - 1))
    per_layer = shape.linear_params / shape.layers
    layers = max(1, round((params - shape.embedding_params) / per_layer))
    scaled = ModelShape(**{**shape.__dict__, "layers": layers})
    return ModelInfo(scaled, f"assumed: {params / 1e9:.1f}B parameters shaped like {label}", False)
