"""The recipe: one YAML file that says what to fine-tune, on what data, how, and on which hardware.

`load_recipe(path)` is the only way in. Every mistake comes back as a CloudtuneError that names the
file, the line, the field path and what to do, so the CLI never shows a traceback for a bad recipe.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from . import safe_yaml, secrets
from .clouds import OWN_CLUSTERS
from .errors import CloudtuneError, printable
from .gguf_kinds import GGUF_ADAPTER, GGUF_KINDS
from .inputs import model_config_problem, open_regular, path_problem, regular_file_problem, writable_dir_problem

# torch 2.8 built for CUDA 12.8: the first builds with Blackwell kernels (B200, RTX 5090, RTX PRO 6000
# are in the catalog), above the [train] extra's floors (transformers 5 needs torch >= 2.5,
# bitsandbytes >= 2.4, trl Python >= 3.11). The runtime flavour, because nothing is compiled on the
# machine and the devel one is twice the download. Pinned to a tag so every run of a recipe starts
# from the same bits; a digest (`image@sha256:...`) pins harder.
DEFAULT_IMAGE = "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime"
METHODS = ("lora", "qlora", "8bit", "fp8", "full")
QUANTISED_METHODS = ("qlora", "8bit")  # bitsandbytes quantises them, on NVIDIA GPUs only (fp8 has a CPU path)
FORMATS = ("auto", "completion", "alpaca", "chat", "llama2-inst")
# The Llama layout's linear layers, which a GGUF LoRA adapter can attach to (lm_head is its output tensor).
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUN_NAME = re.compile(r"^\w[\w.+=@ -]{0,99}$")
# compute.python goes into a shell script on the machine: a command name or a path, nothing a shell reads
MACHINE_PYTHON = re.compile(r"^[\w~/.+-]{1,300}$")
# The planner walks a model layer by layer per offer (an assumed shape of 1e300 parameters never ends,
# 2T takes a minute); 500B is past the largest dense model published.
MIN_PARAMS, MAX_PARAMS = 1e6, 5e11
MAX_RECIPE_BYTES = 2**20
MAX_ECHO_CHARS = 80  # a value quoted back in an error; a 10 MB value must not be



_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmbt]?)\s*$", re.IGNORECASE)


def parse_params(value) -> float:
    """7B, 500M, 1.5b, 7e9 or 7000000000 -> a parameter count."""
    if isinstance(value, (int, float)):
        return float(value)
    found = _SIZE.match(str(value))
    if not found:
        raise CloudtuneError(f"model.params: '{value}' is not a parameter count.", "Write it like 8B, 500M or 7e9.")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[found.group(2).lower()]
    return float(found.group(1)) * scale


def quantising_needs_a_gpu(method: str) -> CloudtuneError:
    """The one refusal of a quantised method where there is no NVIDIA GPU: the trainer's on its device, and
    the local backend's before it starts anything."""
    return CloudtuneError(f"method '{method}' quantises with bitsandbytes, which needs an NVIDIA GPU.",
                          "Run it on a GPU backend, or use method lora/full on this machine.")


class Strict(BaseModel):
    """Every recipe section rejects unknown keys (a typo must never be silently ignored) and every
    number must be finite: YAML's .inf and .nan pass `gt=0` and then hang or poison what uses them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _path_text(value: str | None) -> str | None:
    problem = value is not None and path_problem(value)
    if problem:
        raise ValueError(f"this path {problem}")
    return value


class ModelSpec(Strict):
    name: str | None = Field(None, description="hub id (meta-llama/Llama-2-7b-hf) or a local directory")
    init: Literal["tiny-llama"] | None = Field(
        None, description="build a small random Llama locally instead of loading one (offline demo, tests)")
    revision: str | None = Field(None, description="hub branch, tag or commit")
    trust_remote_code: bool = Field(False, description="run model code from the hub repo (only repos you trust)")
    params: str | float | None = Field(
        None, description="parameter count (8B, 500M) to price a model whose config.json is not available offline")

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; give a hub id (owner/name) or a local model directory")
        return _path_text(value)

    @field_validator("params", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("is not a finite number; write it like 8B, 500M or 7e9")
        return value

    @field_validator("params")
    @classmethod
    def _parameter_count(cls, value: Any) -> Any:
        if value is None:
            return value
        # parse_params' regex backtracks quadratically on a long string of digits
        if len(str(value)) > 32:
            raise ValueError("is too long to be a parameter count; write it like 8B, 500M or 7e9")
        try:
            count = parse_params(value)
        except CloudtuneError as exc:
            raise ValueError("is not a parameter count; write it like 8B, 500M or 7e9") from exc
        # The planner sizes a Llama-like model layer by layer: 1e300 parameters would never finish.
        if not MIN_PARAMS <= count <= MAX_PARAMS:
            raise ValueError(f"{count:.3g} parameters is outside what can be priced (1M to 500B)")
        return value


class LoraSpec(Strict):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank: adapter size and capacity")
    alpha: float = Field(32, gt=0, le=1e6, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (q_proj, v_proj, ...) or all-linear")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")


class ColumnMap(Strict):
    """Which dataset columns feed each format; rename here instead of rewriting the data."""

    text: str = Field("text", description="completion format: the whole document")
    instruction: str = Field("instruction", description="alpaca format: the task")
    input: str = Field("input", description="alpaca format: optional context")
    output: str = Field("output", description="alpaca format: the answer")
    messages: str = Field("messages", description="chat format: list of {role, content}")
    prompt: str = Field("prompt", description="llama2-inst format: the prompt")
    response: str = Field("response", description="llama2-inst format: the answer")


class EvalSpec(Strict):
    """Held-out data the trainer measures its loss on, never trained on."""

    split: float | None = Field(None, gt=0, le=10**12,
                                description="hold out this share (0.1) or this many rows (200) of the training data, "
                                            "picked at random with training.seed")
    path: str | None = Field(None, description="a separate eval file in the training data's format and columns, "
                                               "relative to the recipe")

    @field_validator("split")
    @classmethod
    def _share_or_rows(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("is a share below 1 (0.1) or a whole number of rows (200)")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _path_text(value)


class DatasetSpec(Strict):
    path: str | None = Field(None, description="local .jsonl/.json/.csv/.parquet file, relative to the recipe")
    hub: str | None = Field(None, description="hub dataset id (or anything datasets.load_dataset takes: a builder "
                                              "such as json/csv/parquet with data_files, a directory), "
                                              "loaded on the training machine")
    data_files: str | list[str] | None = Field(
        None, description="with hub: the files to load, as datasets.load_dataset's data_files (paths or globs)")
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="hub dataset split")
    format: Literal["auto", "completion", "alpaca", "chat", "llama2-inst"] = Field(
        "auto", description="how rows become text; auto detects from the columns")
    columns: ColumnMap = Field(ColumnMap(), description="dataset column names per format")
    completions_only: bool = Field(False, description="train only on answers: prompt tokens get no loss")
    chat_template: str | None = Field(
        None, description="chat format: render conversations with this template instead of the model's own, in "
                          "training and in `cloudtune try`: a built-in (llama3, chatml, mistral, gemma) or Jinja text")
    max_rows: int | None = Field(None, gt=0, le=10**12, description="use only the first N rows")
    eval: EvalSpec | None = Field(None, description="held-out data for an eval loss: a share or row count of the "
                                                    "training data (0.1, 200) or a file (eval.jsonl)")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _path_text(value)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        from .chat_templates import problem

        found = value is not None and problem(value)
        if found:
            raise ValueError(found)
        return value

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's `eval: yes` is no share and no file
            return value
        if isinstance(value, int | float):
            return {"split": value}
        return {"path": value} if isinstance(value, str) else value


DEFAULT_EVALUATIONS = 10  # evaluations per run when training.eval_steps is not set, the last one at the end


class EarlyStoppingSpec(Strict):
    patience: int = Field(3, gt=0, le=10**6, description="evaluations in a row without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, le=1e6, description="how much lower the eval loss must be to count as better")


class TrainingSpec(Strict):
    epochs: float | None = Field(None, gt=0, le=10_000, description="passes over the data (default 1 unless max_steps)")
    max_steps: int | None = Field(None, gt=0, le=10**9, description="optimizer steps instead of epochs")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps spent warming up")
    micro_batch_size: int = Field(4, gt=0, le=1024, description="rows per forward pass (packed rows hold many docs)")
    gradient_accumulation: int = Field(1, gt=0, le=65536, description="micro-batches per optimizer step")
    max_seq_len: int = Field(1024, ge=16, le=131072, description="tokens per row; longer documents are truncated")
    packing: bool = Field(True, description="several documents per row, no attention across them")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: only as many layers as the batch needs to fit in GPU memory")
    memory_limit_gib: float | None = Field(
        None, gt=0, le=1e6, description="train within this much GPU memory (a shared GPU, or rehearsing a 24 GB card "
                                "on a bigger one); auto checkpointing fits under it")
    attention: Literal["auto", "documents", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="documents: flash attention within each packed document (PyTorch varlen); "
                            "auto picks it on NVIDIA GPUs, else sdpa")
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger Triton kernels (norm, SwiGLU, RoPE, head+loss without logits) on GPUs")
    precision: Literal["auto", "bf16", "fp16"] = Field(
        "auto", description="16-bit matmuls on the GPU: auto = bf16 where the GPU has it, else fp16 with loss "
                            "scaling (T4, V100; LoRA methods only)")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="8-bit variants (bitsandbytes) save optimizer memory")
    weight_decay: float = Field(0.0, ge=0, le=100, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e9, description="gradient clipping; null turns it off")
    checkpoint_steps: int | None = Field(None, gt=0, le=10**9, description="save a resumable checkpoint every N steps")
    # numpy and CUDA take 32-bit unsigned seeds; anything else fails inside the trainer
    seed: int = Field(42, ge=0, lt=2**32, description="seeds weights init, data order, dropout and the eval split")
    eval_steps: int | None = Field(None, gt=0, le=10**9, description="evaluate every N steps and after the last; "
                                                                     f"default: {DEFAULT_EVALUATIONS} times per run")
    parallelism: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="several GPUs: ddp copies the model to each, fsdp shards weights, gradients and "
                            "optimizer state across them; auto = ddp when the model fits one GPU, else fsdp")
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="stop when the eval loss has not improved for `patience` evaluations (needs dataset.eval)")

    def eval_interval(self, steps: int) -> int:
        """Steps between evaluations of a run of `steps` steps; one more comes after the last step."""
        return self.eval_steps or max(1, math.ceil(steps / DEFAULT_EVALUATIONS))

    def evaluations(self, steps: int) -> int:
        """How many evaluations a run of `steps` steps makes if nothing stops it early."""
        every = self.eval_interval(steps)
        return steps // every + (steps % every != 0)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on`/`off` as a boolean; accept what the user meant.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class OutputsSpec(Strict):
    dir: str | None = Field(None, description="where adapters land; default outputs/<recipe name>")
    merge: bool = Field(False, description="also save the base with the adapter merged in")
    push_to_hub: str | None = Field(None, description="hub repo id (owner/name); needs HF_TOKEN in secrets")
    samples: list[str] = Field(default_factory=list, description="prompts to generate from after training")
    sample_max_new_tokens: int = Field(64, gt=0, le=4096, description="length of each sample generation")
    gguf: list[Literal[GGUF_KINDS]] = Field(
        default_factory=list, description="also write GGUF files (llama.cpp, Ollama) for Llama-layout models: the "
                                          "merged model as f16 or q8_0, the LoRA adapter alone as lora")
    keep: Literal["last", "best"] = Field("last", description="which weights to save: after the last step, or at the "
                                                              "lowest eval loss (needs dataset.eval)")

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str | None) -> str | None:
        return _path_text(value)


class TrackingSpec(Strict):
    service: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="where metrics go besides metrics.jsonl (WANDB_MODE=offline works)")
    project: str | None = Field(None, description="W&B project (default cloudtune)")


class ComputeSpec(Strict):
    gpu: str | None = Field(None, description="GPU name (A10, A100-80GB, H100...); default: cheapest that fits")
    gpu_count: int | None = Field(None, gt=0, le=16, description="GPUs per machine; default: the planner picks "
                                                            "by dollars per run (clouds), every GPU there is "
                                                            "(local, ssh)")
    num_nodes: int = Field(1, gt=0, le=64, description="machines per run (SkyPilot clouds and clusters); each "
                                                       "trains on gpu_count GPUs under torchrun")
    cloud: list[str] = Field(default_factory=list, description="clouds to consider, in order of preference")
    region: str | None = Field(None, description="restrict to one region")
    spot: bool = Field(False, description="spot/preemptible machines; training resumes from checkpoints")
    max_cost: float | None = Field(None, gt=0, le=1e9,
                                   description="refuse a plan whose high estimate exceeds this, and stop the "
                                               "training with its outputs so far once this is spent (USD)")
    price_per_hour: float | None = Field(None, gt=0, le=1e6,
                                         description="what a machine you provide costs per hour (ssh, local), so "
                                                     "the receipt and max_cost count it; clouds are priced by "
                                                     "their catalogs")
    image: str = Field(DEFAULT_IMAGE, description="Docker image, pinned by tag or @sha256 digest")
    remote_env: Literal["python", "docker"] = Field(
        "python", description="ssh backend: the machine's Python (packages in a cached venv) or Docker with "
                              "compute.image")
    python: str | None = Field(None, description="slurm: the Python on the cluster that trains (a command or a "
                                                 "path; default python3); packages it lacks go into a venv built "
                                                 "once and reused")
    disk_gb: int | None = Field(None, gt=0, le=10**6, description="disk size; default from model + data + outputs")
    autostop_minutes: int = Field(30, gt=0, le=10**6, description="idle minutes before the machine tears itself down")

    @field_validator("cloud", mode="before")
    @classmethod
    def _one_cloud(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("cloud")
    @classmethod
    def _own_cluster_alone(cls, value: list[str]) -> list[str]:
        # A cluster of one's own runs no image, the clouds do: one task cannot be both.
        own = [c for c in value if c.lower() in OWN_CLUSTERS]
        if own and len(value) > 1:
            raise ValueError(f"{own[0]} trains on your cluster's own Python, the clouds in a Docker image: "
                             f"name {own[0]} alone, or only clouds")
        return value

    @field_validator("python")
    @classmethod
    def _machine_python(cls, value: str | None) -> str | None:
        if value is not None and not MACHINE_PYTHON.fullmatch(value):
            raise ValueError("a command (python3.11) or a path (/opt/venv/bin/python): letters, digits and "
                             "_ ~ / . + - only, no spaces or shell characters")
        return value

    @property
    def own_cluster(self) -> str | None:
        """The cloud of a cluster the user has (slurm) when this trains on one, else None."""
        return next((c.lower() for c in self.cloud if c.lower() in OWN_CLUSTERS), None)


class Recipe(Strict):
    name: str | None = Field(None, description="run name; default: the recipe file's name")
    model: ModelSpec = Field(description="base model: a hub id or path string, or a section")
    method: Literal["lora", "qlora", "8bit", "fp8", "full"] = Field(
        "lora", description="lora: bf16 base; qlora: 4-bit nf4 base; 8bit: int8 base; fp8: float8 base "
                            "(GPUs with FP8: L4, L40S, RTX 4090, H100, H200, B200); full: all weights")
    lora: LoraSpec = Field(LoraSpec(), description="adapter settings (not for method full)")
    dataset: DatasetSpec = Field(description="training data")
    training: TrainingSpec = Field(TrainingSpec(), description="optimisation settings")
    outputs: OutputsSpec = Field(OutputsSpec(), description="what comes back and where")
    tracking: TrackingSpec = Field(TrackingSpec(), description="experiment tracking; a bare string names the service")
    compute: ComputeSpec = Field(ComputeSpec(), description="hardware and budget")
    secrets: list[str] = Field(default_factory=list, description="names of env vars forwarded to training")

    _source: Path | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str | None) -> str | None:
        # The name becomes one directory under outputs/ (and a ledger entry): `../../x` or `a/b` would
        # write somewhere else.
        if value is not None and not RUN_NAME.fullmatch(value):
            raise ValueError("a run name is one file name: letters, digits and . _ - + = @ or spaces, "
                             "starting with a letter or digit, at most 100 characters")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, value: Any) -> Any:
        return {"service": value} if isinstance(value, str) else value

    @property
    def source(self) -> Path | None:
        """The recipe file this was loaded from; relative dataset paths are resolved against it."""
        return self._source

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        return self._source.stem if self._source else "run"

    @property
    def uses_lora(self) -> bool:
        return self.method != "full"

    @property
    def fsdp_refusal(self) -> str | None:
        """Why FSDP cannot shard this fine-tune (None when it can): `training.parallelism: fsdp` is refused
        for it, and `auto` keeps it to ddp, so offers that only FSDP would fit are left out."""
        if self.method in ("8bit", "fp8"):
            return (f"method {self.method} cannot be sharded with FSDP: its 8-bit weights beside the 16-bit ones "
                    "are not one dtype FSDP can split")
        if self.training.optimizer != "adamw":
            # measured on an H200 (bench/results/fsdp_one_gpu.jsonl): bitsandbytes 0.50's step raises on them
            return (f"optimizer {self.training.optimizer} (bitsandbytes) cannot step the sharded parameters "
                    "(DTensors) of FSDP")
        return None

    def gpu_precision(self, gpu: str, has_bf16: bool, has_fp8: bool) -> str:
        """"bf16" or "fp16": what the trainer computes in on this GPU (auto: bf16 where the GPU has it,
        else fp16 with loss scaling). Raises CloudtuneError when it cannot train this recipe there; the
        planner marks such offers as not fitting with the same message."""
        if self.method == "fp8" and not has_fp8:
            raise CloudtuneError(f"method fp8 needs FP8 tensor cores, and {gpu} has none",
                                 "Use a GPU with FP8 (L4, L40S, RTX 4090, H100, H200, B200), or method lora, "
                                 "qlora or 8bit.")
        wanted = self.training.precision
        if wanted == "bf16" and not has_bf16:
            raise CloudtuneError(f"training.precision bf16, and {gpu} has no bf16",
                                 "Set precision to auto or fp16, or use a GPU with bf16 (A10, L4, A100, H100, ...).")
        if wanted == "bf16" or (wanted == "auto" and has_bf16):
            return "bf16"
        if not self.uses_lora:  # fp16 weights round small updates away; there is no fp32 master copy
            raise CloudtuneError(f"full fine-tuning needs bf16, and {gpu} has only fp16",
                                 "Use a GPU with bf16 (A10, L4, A100, H100, ...) or a LoRA method.")
        return "fp16"

    def dataset_file(self) -> Path | None:
        """The local dataset as an absolute path, or None for a hub dataset."""
        return self._data_file(self.dataset.path, "dataset.path")

    def eval_file(self) -> Path | None:
        """dataset.eval's own file as an absolute path, or None when eval rows are split off (or no eval)."""
        return self._data_file(self.dataset.eval.path if self.dataset.eval else None, "dataset.eval.path")

    @property
    def evaluates(self) -> bool:
        return self.dataset.eval is not None

    def _data_file(self, value: str | None, field: str) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and self._source is not None:
            path = self._source.parent / path
        try:
            return path.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python 3.11
            raise CloudtuneError(f"{field} {path}: cannot be followed ({exc}).",
                                 f"Point {field} at the data file itself.") from None

    def local_model_dir(self) -> Path | None:
        """model.name as a local directory, found as the planner finds it; None for a hub id."""
        if self.model.name is None:
            return None
        local = Path(self.model.name).expanduser()
        if not local.is_absolute() and self._source is not None and (self._source.parent / local).exists():
            local = self._source.parent / local
        return local if local.is_dir() else None

    def fingerprint(self) -> str:
        """A short hash of everything that changes what gets trained, for receipts and caching."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def training_fingerprint(self) -> str:
        """What must not change between a run and its resumption (outputs and compute may). A local dataset
        counts by its content, not where it lies: the laptop and every machine the run moves to agree."""
        parts = self.model_dump(mode="json", include={"model", "method", "lora", "dataset", "training"})
        dataset_file = self.dataset_file()
        if dataset_file is not None and dataset_file.is_file():
            parts["dataset"]["path"] = _content_hash(dataset_file)
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading with errors that point at the line


def load_recipe(path: str | Path, here: bool = True) -> Recipe:
    """Read, validate and cross-check a recipe. `here`: also check what must exist on this machine
    (outputs.dir can be written, a local model directory is one); the training machine passes False,
    because the laptop's paths mean nothing there."""
    path = Path(path)
    _check_recipe_path(path)
    data, lines = safe_yaml.load(_read_text(path), path)
    if not isinstance(data, dict):
        raise CloudtuneError(f"{path}: a recipe is a YAML mapping of sections (model:, dataset:, ...), "
                             f"but this file holds {type(data).__name__}.",
                             "Start from `cloudtune init` to get a commented recipe.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise CloudtuneError(_describe_validation(path, exc, lines),
                             "Fix the field(s) named above; `cloudtune init` writes a commented example.") from None
    except RecursionError:  # safe_yaml bounds the depth; this only keeps a traceback impossible
        raise CloudtuneError(f"{path}: nested too deeply to validate.") from None
    recipe._source = path.resolve()
    secrets.watch(recipe.secrets)  # from here on, every message this process prints hides their values
    problems = _cross_check(recipe) + (_local_checks(recipe) if here else [])
    if problems:
        field, message = problems[0]
        raise CloudtuneError(f"{path}:{_line_for(field, lines)}: {_field_name(field)}: {message}")
    return recipe


def _check_recipe_path(path: Path) -> None:
    # The path is printed in every message and on success: a name the terminal cannot take would
    # turn the first print into a UnicodeEncodeError, and escape sequences would reach the terminal.
    problem = path_problem(str(path))
    if problem:
        raise CloudtuneError(f"{printable(str(path))}: the recipe's path {problem}.",
                             "Rename the file (or its folder) to plain text.")
    try:
        path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python 3.11
        raise CloudtuneError(f"{path}: the recipe's path cannot be followed ({exc}).") from None


def _read_text(path: Path) -> str:
    hint = "Check the path, or create one with `cloudtune init`."
    if not os.path.lexists(path):
        raise CloudtuneError(f"{path}: no such recipe file.", hint)
    with open_regular(path, "recipe", hint) as handle:
        raw = handle.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise CloudtuneError(f"{path}: over {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a few KB of settings.",
                             "Is this the recipe? Data belongs in the dataset file that dataset.path names.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CloudtuneError(f"{path}:{line}: the recipe is not UTF-8 text (byte {exc.start}).",
                             "Save the file as UTF-8.") from None


def _line_for(field: tuple, lines: dict[tuple, int]) -> int:
    for end in range(len(field), 0, -1):
        if field[:end] in lines:
            return lines[field[:end]]
    return 1


def _clean_loc(loc: tuple) -> tuple:
    # Pydantic puts union-member tags (e.g. "list[str]", "literal['all-linear']") into locations.
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "float")))


def _describe_validation(path: Path, exc: ValidationError, lines: dict[tuple, int]) -> str:
    seen: dict[tuple, str] = {}
    for err in exc.errors():
        field = _clean_loc(tuple(err["loc"]))
        if field in seen:
            continue
        seen[field] = _explain(err, field)
    out = [f"{path}:{_line_for(field, lines)}: {_field_name(field)}: {message}" for field, message in seen.items()]
    return "\n".join(out[:8]) + (f"\n... and {len(out) - 8} more" if len(out) > 8 else "")


def _field_name(field: tuple) -> str:
    return ".".join(_echo(part) for part in field) or "(top level)"


def _echo(value: Any) -> str:
    """A value quoted back in a message: printable and short."""
    return printable(value if isinstance(value, str) else repr(value), MAX_ECHO_CHARS)


def _explain(err: dict, field: tuple) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(field[:-1])
        guess = difflib.get_close_matches(str(field[-1])[:MAX_ECHO_CHARS], allowed, n=1, cutoff=0.6)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        return f"unknown key '{_echo(field[-1])}'.{hint} Allowed here: {', '.join(allowed)}."
    if kind == "missing":
        return "is required but missing."
    got = err.get("input")
    shown = type(got).__name__ if isinstance(got, (dict, list)) else \
        f"'{_echo(got)}'" if isinstance(got, str) else _echo(got)
    message = err["msg"].removeprefix("Value error, ")
    return f"{message} (got {shown})."


def _allowed_keys(section: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in section:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return []
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _cross_check(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Rules that span fields; each names the field to change."""
    return (_training_problems(recipe) + _source_problems(recipe) + _eval_problems(recipe)
            + _publishing_problems(recipe))


def _training_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    fields_set = recipe.model_fields_set
    if recipe.method == "full" and "lora" in fields_set:
        problems.append((("lora",), "method 'full' trains every weight, so LoRA settings do not apply. "
                                    "Remove the lora section, or choose method lora, qlora, 8bit or fp8."))
    if recipe.method == "full" and recipe.training.precision == "fp16":
        problems.append((("training", "precision"), "full fine-tuning trains its weights in the compute dtype, and "
                                                    "fp16 weights round small updates away (cloudtune keeps no fp32 "
                                                    "master copy). Use bf16 or auto on a GPU with bf16, or a LoRA "
                                                    "method."))
    if recipe.training.epochs is not None and recipe.training.max_steps is not None:
        problems.append((("training", "max_steps"), "set either epochs or max_steps, not both."))
    if recipe.training.parallelism == "fsdp" and recipe.fsdp_refusal:
        problems.append((("training", "parallelism"), f"{recipe.fsdp_refusal}. Use ddp (each GPU holds the whole "
                         "model) or auto, or method qlora, lora or full with optimizer adamw."))
    return problems


def _source_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    dataset = recipe.dataset
    if (dataset.path is None) == (dataset.hub is None):
        problems.append((("dataset",), "give exactly one of `path` (a local file) or `hub` (a hub dataset id)."))
    elif dataset.data_files is not None and dataset.hub is None:
        problems.append((("dataset", "data_files"), "data_files goes with `hub` (e.g. hub: json); "
                                                    "for one local file use `path` instead."))
    elif dataset.path is not None:
        problems += _data_file_problems(("dataset", "path"), recipe.dataset_file)
    if recipe.model.name is None and recipe.model.init is None:
        problems.append((("model",), "give `name` (hub id or local path) or `init: tiny-llama`."))
    if recipe.model.name is not None and recipe.model.init is not None:
        problems.append((("model", "init"), "give either `name` or `init`, not both."))
    return problems


def _publishing_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    for i, name in enumerate(recipe.secrets):
        if not ENV_NAME.fullmatch(name):
            problems.append((("secrets", i), f"'{_echo(name)}' is not an environment variable name."))
    push = recipe.outputs.push_to_hub
    if push is not None:
        if not HUB_REPO.fullmatch(push):
            problems.append((("outputs", "push_to_hub"), f"'{_echo(push)}' is not a hub repo id like owner/name."))
        elif "HF_TOKEN" not in recipe.secrets:
            problems.append((("outputs", "push_to_hub"), "pushing needs a token: add HF_TOKEN to `secrets`."))
    if GGUF_ADAPTER in recipe.outputs.gguf:
        problems += _gguf_adapter_problems(recipe)
    return problems


def _gguf_adapter_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    if not recipe.uses_lora:
        return [(("outputs", "gguf"), "'lora' writes the LoRA adapter alone, and method 'full' trains every weight: "
                                      "there is no adapter. Use f16 or q8_0 for the whole model.")]
    if recipe.lora.use_dora:
        return [(("lora", "use_dora"), "llama.cpp's LoRA adapter file has no place for DoRA's magnitude vectors. "
                                       "Drop use_dora, or ask outputs.gguf for f16/q8_0 (the merged model).")]
    targets = recipe.lora.target_modules
    outside = [] if targets == "all-linear" else [t for t in targets if t.rsplit(".", 1)[-1] not in LLAMA_LINEAR]
    if outside:
        return [(("lora", "target_modules"), f"{', '.join(map(_echo, outside))}: outside the Llama layout's linear "
                                             f"layers ({', '.join(LLAMA_LINEAR)}), which are all a GGUF LoRA adapter "
                                             "can attach to. Target those, or ask outputs.gguf for f16/q8_0.")]
    return []


def _data_file_problems(field: tuple, resolve: Callable[[], Path | None]) -> list[tuple[tuple, str]]:
    """What is wrong with the data file at `field`, which `resolve` turns into a path."""
    name = ".".join(field)
    try:
        file = resolve()
    except CloudtuneError as exc:
        return [(field, f"{exc.message.removeprefix(name + ' ')} {exc.hint}")]
    problem = regular_file_problem(file)
    if problem == "no such file":
        return [(field, f"file not found: {file}. Paths are relative to the recipe file.")]
    if problem:
        return [(field, f"{file} {problem}: point it at the data file itself.")]
    if file.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        return [(field, f"unsupported file type '{file.suffix}': use .jsonl, .json, .csv or .parquet.")]
    problem = path_problem(str(file))  # shown on success: the resolved path must print too
    if problem:
        return [(field, f"the resolved path {problem}; rename the folders on the way.")]
    return []


def _eval_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Settings that need an eval loss, and the eval section itself."""
    evaluation = recipe.dataset.eval
    if evaluation is None:
        needs = [(("training", "eval_steps"), recipe.training.eval_steps is not None),
                 (("training", "early_stopping"), recipe.training.early_stopping is not None),
                 (("outputs", "keep"), recipe.outputs.keep == "best")]
        return [(field, "needs an eval loss: add dataset.eval (a share like 0.1, a row count, or a file).")
                for field, given in needs if given]
    if (evaluation.split is None) == (evaluation.path is None):
        return [(("dataset", "eval"), "give exactly one of `split` (a share or row count of the training data) "
                                      "or `path` (an eval file).")]
    if evaluation.path is not None:
        return _data_file_problems(("dataset", "eval", "path"), recipe.eval_file)
    return []


def _local_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """What only holds on the machine that starts the run (see load_recipe's `here`)."""
    problems: list[tuple[tuple, str]] = []
    local = recipe.local_model_dir()
    if local is not None and (local / "config.json").exists():
        problem = model_config_problem(local / "config.json")
        if problem:
            problems.append((("model", "name"), problem))
    elif local is not None:
        problems.append((("model", "name"), f"{local} is a directory without config.json, so not a model. "
                                            "Give a hub id (owner/name) or a directory saved by save_pretrained."))
    out = Path(recipe.outputs.dir).expanduser() if recipe.outputs.dir else Path("outputs") / recipe.run_name
    problem = writable_dir_problem(out.absolute())
    if problem:
        problems.append((("outputs", "dir") if recipe.outputs.dir else ("name",),
                         f"the outputs would go to {out.absolute()}, which {problem}. Choose a directory "
                         "you can write to (outputs.dir)."))
    return problems


def with_compute_overrides(recipe: Recipe, **overrides: Any) -> Recipe:
    """The recipe with command-line overrides of its compute section, validated as if written in the file."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if not given:
        return recipe
    data = {**recipe.compute.model_dump(mode="json", exclude_unset=True), **given}
    try:
        compute = ComputeSpec.model_validate(data)
    except ValidationError as exc:
        problem = exc.errors()[0]
        flag = "--" + str(problem["loc"][0]).replace("_", "-") if problem["loc"] else "an option"
        raise CloudtuneError(f"{flag}: {problem['msg']}.", "Fix the option, or set compute in the recipe.") from None
    return recipe.model_copy(update={"compute": compute})


_content_hashes: dict[tuple[str, int, int], str] = {}


def _content_hash(path: Path) -> str:
    """sha256 of a file, read once per process for a given size and mtime (a checkpoint is saved every N steps)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _content_hashes:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        _content_hashes[key] = digest.hexdigest()
    return _content_hashes[key]
