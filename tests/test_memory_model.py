"""The memory model against measured peaks and against what autograd really keeps.

Every row of bench/results/h100-anchor-measurements.jsonl (a copy of the shared H100 anchors) and
cloudtune's own H100 rows must be predicted within ±20 %. What each anchor profile ran is spelled
out below from ../shared/bench/seed_baseline.py and unsloth_bench.py.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from cloudtune.errors import CloudtuneError
from cloudtune.planning.memory import (
    ALL_LINEAR,
    GIB,
    ModelShape,
    TrainSetup,
    _with_optimizer,
    cloudtune_kbit_fp32_stack,
    cloudtune_stack,
    layer_activation_bytes,
    layers_to_checkpoint,
    lora_params,
    memory_peak,
    trl_stack,
    unsloth_stack,
)

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO / "bench" / "results" / "h100-anchor-measurements.jsonl"
COST_ACCURACY = REPO / "bench" / "results" / "cost_accuracy.jsonl"
LLAMA2_7B = ModelShape(4096, 11008, 32, 32, 32, 32000)
QV = ("q_proj", "v_proj")
TOLERANCE = 0.20


def padding_free_peak_tokens(rows_per_batch: int, batches: int = 15, trials: int = 300) -> float:
    """Expected largest micro-batch when rows are concatenated without padding (Unsloth's batching):
    the biggest of `batches` sums of guanaco-like lengths (lognormal, median 350, capped at 1024)."""
    rng = random.Random(0)
    total = 0.0
    for _ in range(trials):
        total += max(sum(int(min(1024, max(16, rng.lognormvariate(math.log(350), 0.8))))
                         for _ in range(rows_per_batch)) for _ in range(batches))
    return total / trials


# profile -> (setup, tokens in the peak micro-batch, gradient checkpointing)
# Unpacked trl batches pad to their longest row; with 18 batches of 4 or 8 guanaco-like rows one of
# them almost surely holds a row cut at max_len 1024, so the peak batch is rows × 1024. trl's packing
# fills 4 rows of 4096. Unsloth concatenates its 8 rows without padding.
UNSLOTH_PEAK = padding_free_peak_tokens(8)
PROFILES = {
    "seed-qlora": (TrainSetup("qlora", 64, QV, 0.1, double_quant=False,
                              stack=trl_stack("qlora", optimizer="paged_adamw_32bit")), 4 * 1024, True),
    "seed-lora": (TrainSetup("lora", 8, QV, 0.1, stack=trl_stack("lora", optimizer="paged_adamw_32bit")),
                  4 * 1024, True),
    "hf-best-qlora": (TrainSetup("qlora", 16, ALL_LINEAR, 0.0, double_quant=False,
                                 stack=trl_stack("qlora", liger=True)), 4 * 4096, True),
    "hf-best-lora": (TrainSetup("lora", 16, ALL_LINEAR, 0.0, stack=trl_stack("lora", liger=True)), 4 * 4096, True),
    "nogc-lora": (TrainSetup("lora", 16, ALL_LINEAR, 0.0, stack=trl_stack("lora", liger=True)), 8 * 1024, False),
    "nogc-qlora": (TrainSetup("qlora", 16, ALL_LINEAR, 0.0, double_quant=False,
                              stack=trl_stack("qlora", liger=True)), 8 * 1024, False),
    "unsloth-gc": (TrainSetup("qlora", 16, ALL_LINEAR, 0.0, stack=unsloth_stack()), UNSLOTH_PEAK, True),
    "unsloth-nogc": (TrainSetup("qlora", 16, ALL_LINEAR, 0.0, stack=unsloth_stack()), UNSLOTH_PEAK, False),
    "unsloth-packed": (TrainSetup("qlora", 16, ALL_LINEAR, 0.0, stack=unsloth_stack()), 2 * 4096, True),
    "unsloth-lora-nogc": (TrainSetup("lora", 16, ALL_LINEAR, 0.0, stack=unsloth_stack()), UNSLOTH_PEAK, False),
    "unsloth-lora-gc": (TrainSetup("lora", 16, ALL_LINEAR, 0.0, stack=unsloth_stack()), UNSLOTH_PEAK, True),
}


def _anchor_rows() -> list[dict]:
    return [json.loads(line) for line in ANCHORS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _anchor_rows(), ids=lambda r: r["profile"])
def test_every_h100_anchor_peak_is_predicted_within_20_percent(row):
    setup, tokens, checkpointing = PROFILES[row["profile"]]
    if row.get("trainable_params"):
        assert lora_params(LLAMA2_7B, setup) == row["trainable_params"]  # the setup is the one that ran
    predicted = memory_peak(LLAMA2_7B, setup, int(tokens), LLAMA2_7B.layers if checkpointing else 0).gib
    assert predicted == pytest.approx(row["peak_mem_gib"], rel=TOLERANCE), (row["profile"], predicted)


def _cloudtune_setup(method: str, optimizer: str = "adamw", stack=None) -> TrainSetup:
    stack = stack or cloudtune_stack(method)
    return TrainSetup(method, 16, ALL_LINEAR, 0.0, stack=_with_optimizer(stack, optimizer))


# cloudtune's own trainer on an H100, Llama-2-7B shape, LoRA all-linear r16 without dropout, packed rows
# (so the peak micro-batch is micro_batch_size × max_seq_len). From bench/results/gpu_methods.jsonl
# (recipes in bench/gpu_methods.py) and train_speed.jsonl (profiles in bench/train_speed.py), 2026-11-23.
# The first six ran before main c753919, when quantised bases were upcast to fp32 and no fused kernels
# existed; the next ten before bf16 autocast came in (each LoRA module copied its input to fp32),
# Liger kernels on unless the profile turned them off; the last ones run the current trainer.
OLD_KBIT = cloudtune_kbit_fp32_stack()
FUSED, PLAIN = cloudtune_stack("lora", fused_kernels=True, autocast=False), cloudtune_stack("lora", autocast=False)
CURRENT = cloudtune_stack("qlora", fused_kernels=True)
CLOUDTUNE_ROWS = [
    ("qlora", "adamw", 2 * 2048, False, OLD_KBIT, 44.65),
    ("lora", "adamw", 2 * 2048, False, PLAIN, 48.54),
    ("full", "adamw_8bit", 1 * 2048, True, PLAIN, 38.12),
    ("8bit", "adamw", 2 * 2048, False, OLD_KBIT, 69.21),  # one of the rows INT8_SAVED_BYTES_PER_ACT_BYTE rests on
    ("qlora", "adamw", 2 * 4096, True, OLD_KBIT, 11.92),
    ("lora", "adamw", 2 * 4096, True, PLAIN, 18.15),
    ("qlora", "adamw", 2 * 4096, False, FUSED, 64.34),  # cloudtune-qlora
    ("qlora", "adamw", 1 * 4096, False, FUSED, 34.23),  # cloudtune-qlora-nogc
    ("qlora", "adamw", 1 * 4096, False, PLAIN, 40.10),  # cloudtune-qlora-nofuse
    ("lora", "adamw", 1 * 4096, False, FUSED, 43.17),  # cloudtune-lora-nogc
    ("lora", "adamw", 2 * 4096, False, FUSED, 73.28),  # cloudtune-lora
    ("qlora", "adamw", 2 * 4096, True, FUSED, 8.54),  # cloudtune-qlora-24g
    ("qlora", "adamw", 2 * 2048, True, FUSED, 6.31),  # gpu_methods
    ("8bit", "adamw", 2 * 2048, True, FUSED, 17.89),  # gpu_methods; the other 8-bit calibration row
    ("lora", "adamw", 2 * 2048, True, FUSED, 15.28),  # gpu_methods
    ("full", "adamw_8bit", 1 * 2048, True, FUSED, 38.12),  # gpu_methods
    ("qlora", "adamw", 2 * 4096, False, CURRENT, 36.82),  # cloudtune-qlora
    ("qlora", "adamw", 1 * 4096, 17, CURRENT, 12.44),  # cloudtune-qlora-24g: 17 of 32 layers recomputed
    # H200, 2026-12-02 (train_speed.jsonl), with fused LoRA: the fp8 base and qlora in one run
    ("fp8", "adamw", 2 * 4096, False, CURRENT, 39.52),  # cloudtune-fp8
    ("qlora", "adamw", 2 * 4096, False, CURRENT, 36.59),  # cloudtune-qlora
]


@pytest.mark.parametrize("method,optimizer,tokens,checkpointing,stack,measured", CLOUDTUNE_ROWS)
def test_cloudtune_trainer_peaks_on_h100(method, optimizer, tokens, checkpointing, stack, measured):
    """`checkpointing`: False, True (every layer) or how many layers were recomputed."""
    layers = LLAMA2_7B.layers * checkpointing if isinstance(checkpointing, bool) else checkpointing
    predicted = memory_peak(LLAMA2_7B, _cloudtune_setup(method, optimizer, stack), tokens, layers).gib
    assert predicted == pytest.approx(measured, rel=TOLERANCE)


def test_rows_written_by_the_cost_accuracy_benchmark():
    """bench/cost_accuracy.py records each run's own settings, so every row it adds is checked too."""
    rows = [json.loads(line) for line in COST_ACCURACY.read_text().splitlines()] if COST_ACCURACY.exists() else []
    for row in rows:
        if row.get("peak_gib") is None or "predicted_peak_gib" not in row:
            continue
        shape = ModelShape(**row["shape"])
        stack = cloudtune_stack(row["method"], row.get("fused_kernels", False),
                                autocast=row.get("autocast", "off") != "off")
        setup = TrainSetup(row["method"], row["lora_r"], tuple(row["lora_targets"]), row["lora_dropout"],
                           stack=_with_optimizer(stack, row["optimizer"]))
        layers = row.get("checkpointed_layers", shape.layers if row["gradient_checkpointing"] else 0)
        predicted = memory_peak(shape, setup, row["peak_tokens"], layers).gib
        assert predicted == pytest.approx(row["peak_gib"], rel=TOLERANCE), row["name"]


def _saved_activation_bytes(recipe, config, batch: tuple[int, int]) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded) in one forward pass."""
    import torch
    from transformers import LlamaForCausalLM

    from cloudtune.train import model as model_lib

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    model = model_lib.prepare_for_training(recipe, model, checkpointed_layers=0, autocast=True)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    ids = torch.randint(3, config.vocab_size, batch)
    # as on a bf16 GPU: the forward under bf16 autocast (train/model.mixed_precision)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


@pytest.mark.parametrize("method,targets,dropout", [
    ("full", None, 0.0),
    ("lora", ["q_proj", "v_proj"], 0.05),
    ("lora", "all-linear", 0.0),
    ("lora", "all-linear", 0.1),
    ("lora", ["k_proj", "o_proj", "down_proj"], 0.0),
])
def test_activation_model_matches_what_autograd_keeps_in_cloudtunes_model(method, targets, dropout):
    """cloudtune's own model preparation (train/model.py) on a small bf16 Llama with grouped-query
    attention: the per-layer bytes the memory model predicts are what autograd saves, layer by layer."""
    from transformers import LlamaConfig

    from cloudtune.recipe import Recipe

    data = dict(model={"init": "tiny-llama"}, method=method, dataset={"path": str(ANCHORS)},
                training={"fused_kernels": "off"})  # measured on the CPU, where the kernels never run
    if method != "full":
        data["lora"] = dict(r=8, target_modules=targets, dropout=dropout)
    recipe = Recipe.model_validate(data)
    sizes = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
                 vocab_size=5000, max_position_embeddings=1024, tie_word_embeddings=False)
    batch = (2, 128)
    one = _saved_activation_bytes(recipe, LlamaConfig(num_hidden_layers=1, **sizes), batch)
    three = _saved_activation_bytes(recipe, LlamaConfig(num_hidden_layers=3, **sizes), batch)
    measured_per_layer = (three - one) / 2 / (batch[0] * batch[1])
    shape = ModelShape(384, 1024, 1, 6, 2, 5000)
    setup = TrainSetup.from_recipe(recipe)
    # CPU dropout masks have the input's dtype (bf16 here), where CUDA's are bool
    setup = replace(setup, stack=replace(setup.impl, mask_bytes=2))
    assert layer_activation_bytes(shape, setup) == pytest.approx(measured_per_layer, rel=0.03)


def test_checkpointing_covers_only_the_layers_the_batch_needs():
    setup = _cloudtune_setup("qlora")
    # after loading a 7B in 4 bits: ~74 GiB free on an H100, ~18 GiB on an A10G, ~4 GiB on a T4
    assert layers_to_checkpoint(LLAMA2_7B, 2 * 2048, 74 * GIB, setup) == 0
    on_a10g = layers_to_checkpoint(LLAMA2_7B, 2 * 2048, 18 * GIB, setup)
    assert 0 < on_a10g < LLAMA2_7B.layers, "a 24 GB card keeps some layers' activations instead of recomputing all"
    assert layers_to_checkpoint(LLAMA2_7B, 2 * 2048, 4 * GIB, setup) == LLAMA2_7B.layers
    assert layers_to_checkpoint(LLAMA2_7B, 8 * 4096, 60 * GIB, _cloudtune_setup("lora")) > 0
    # the answer is the fewest: one layer fewer would not fit
    as_loaded = memory_peak(LLAMA2_7B, setup, 4096, 0).weights

    def needed(layers: int) -> float:
        return memory_peak(LLAMA2_7B, setup, 2 * 2048, layers).total - as_loaded

    assert needed(on_a10g) < needed(on_a10g - 1) and needed(on_a10g - 1) * 1.08 > 0.95 * 18 * GIB
    assert memory_peak(LLAMA2_7B, setup, 4096, 32).total == memory_peak(LLAMA2_7B, setup, 4096, 99).total
    # fused kernels keep less per layer and never build the logits: more fits without recomputation
    fused = _cloudtune_setup("lora", stack=cloudtune_stack("lora", fused_kernels=True))
    plain = _cloudtune_setup("lora")
    with_fused, without = memory_peak(LLAMA2_7B, fused, 4096, 0), memory_peak(LLAMA2_7B, plain, 4096, 0)
    assert with_fused.activations < 0.9 * without.activations and with_fused.logits < 0.1 * without.logits


def test_model_shapes_come_from_config_and_table(tmp_path):
    from cloudtune.planning.models import resolve_model
    from cloudtune.recipe import Recipe

    def recipe(**model):
        return Recipe.model_validate(dict(model=model, dataset={"path": str(ANCHORS)}))

    info = resolve_model(recipe(name="NousResearch/Llama-2-7b-chat-hf"))
    assert info.shape == LLAMA2_7B and info.exact
    assert resolve_model(recipe(name="meta-llama/Meta-Llama-3.1-8B-Instruct")).shape.vocab == 128256
    assert round(resolve_model(recipe(name="Qwen/Qwen2.5-0.5B-Instruct")).shape.params / 1e6) == 494

    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=50000, tie_word_embeddings=True)))
    info = resolve_model(recipe(name=str(local)))
    assert info.shape == ModelShape(1024, 2816, 12, 16, 4, 50000, None, True)

    cache = tmp_path / "hub"  # the Hugging Face cache layout: models--org--name/refs/main -> snapshot
    snapshot = cache / "models--acme--widget-1b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((local / "config.json").read_text())
    (cache / "models--acme--widget-1b" / "refs").mkdir()
    (cache / "models--acme--widget-1b" / "refs" / "main").write_text("abc123")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        assert resolve_model(recipe(name="acme/widget-1b")).shape.hidden == 1024

    with pytest.raises(CloudtuneError) as unknown:
        resolve_model(recipe(name="acme/secret-model"))
    assert "params" in unknown.value.hint and "config.json" in unknown.value.hint
    assumed = resolve_model(recipe(name="acme/secret-model", params="8B"))
    assert not assumed.exact and assumed.shape.params == pytest.approx(8e9, rel=0.05)
