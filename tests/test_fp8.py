"""`method: fp8` (cloudtune/train/fp8.py) on the CPU: the dequantised fallback computes what the FP8 tensor
cores compute on a GPU, so the per-layer error, the training and the reload are checked here; the speed
and the _scaled_mm path are measured on the GPU (bench/fp8_layers.py, bench/train_speed.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from cloudtune.errors import CloudtuneError
from cloudtune.planning.gpus import SPECS
from cloudtune.planning.memory import ModelShape, TrainSetup, weight_bytes
from cloudtune.planning.models import KNOWN_MODELS
from cloudtune.planning.planner import precision_problem
from cloudtune.recipe import Recipe
from cloudtune.train.fp8 import Float8Linear, layer_errors, quantise_decoder_linears, quantise_rows
from cloudtune.train.model import tiny_llama_dir
from cloudtune.train.verify import max_logit_difference, sixteen_bit_base_difference

from .test_train import ALPACA, make_recipe, metrics, run


def test_rows_are_quantised_to_e4m3_with_one_scale_each():
    matrix = torch.randn(32, 64) * torch.logspace(-3, 2, 32)[:, None]  # rows five decades apart
    quantised, scale = quantise_rows(matrix)
    assert quantised.dtype == torch.float8_e4m3fn and scale.shape == (32,)
    assert quantised.float().abs().amax(dim=1).eq(448).all()  # each row uses e4m3's whole range
    error = (quantised.float() * scale[:, None] - matrix).norm(dim=1) / matrix.norm(dim=1)
    assert error.max() < 0.04  # 3 mantissa bits: about 2-3 % per row, whatever the row's magnitude


def test_each_projection_of_the_tiny_model_in_fp8_against_fp32(ct_home, capsys):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    model = copy.deepcopy(reference)
    assert quantise_decoder_linears(model, torch.float32) == 2 * 7
    assert isinstance(model.model.layers[0].mlp.down_proj, Float8Linear)
    assert type(model.lm_head) is torch.nn.Linear  # the head and embeddings stay 16/32-bit
    errors = layer_errors(model, reference, torch.randint(3, 259, (2, 64)))
    with capsys.disabled():
        print("\nfp8 per-layer relative output error:", {k.split("layers.")[1]: f"{v:.4f}" for k, v in errors.items()})
    assert len(errors) == 14
    assert all(0.005 < error < 0.05 for error in errors.values()), errors  # quantised, and by e4m3's rounding
    with torch.no_grad():
        ids = torch.randint(3, 259, (1, 32))
        logits, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert ((logits - want).norm() / want.norm()).item() < 0.05


def test_fp8_trains_like_lora_and_its_adapter_reloads_on_both_bases(tmp_path):
    losses = {}
    for method in ("lora", "fp8"):
        out = tmp_path / method / "out"
        run(make_recipe(tmp_path / method, ALPACA, method=method, training={"max_steps": 8}), out)
        losses[method] = [row["loss"] for row in metrics(out)]
    assert losses["fp8"][-1] < 0.95 * losses["fp8"][0], losses  # it learns
    for fp8, lora in zip(losses["fp8"], losses["lora"], strict=True):  # and as the 16-bit base does
        assert fp8 == pytest.approx(lora, rel=0.01), losses
    assert max_logit_difference(out, str(tiny_llama_dir())) < 1e-4  # the fp8 base reproduces training
    on_sixteen_bit = sixteen_bit_base_difference(out, str(tiny_llama_dir()))
    assert on_sixteen_bit is not None and 1e-4 < on_sixteen_bit < 1.0  # FP8's rounding, and no more
    assert sixteen_bit_base_difference(tmp_path / "lora" / "out", str(tiny_llama_dir())) is None


def test_fp8_is_refused_on_gpus_without_fp8_and_planned_on_those_with():
    recipe = Recipe.model_validate({"model": "m", "method": "fp8", "dataset": {"hub": "x"}})
    with pytest.raises(CloudtuneError, match="method fp8 needs FP8 tensor cores, and A100 has none"):
        recipe.gpu_precision("A100", True, SPECS["A100"].fp8)
    assert "FP8 tensor cores" in precision_problem(recipe, "A100")
    assert "FP8 tensor cores" in precision_problem(recipe, "T4")
    for gpu in ("H100", "H200", "L4", "L40S", "RTX4090"):
        assert precision_problem(recipe, gpu) is None, gpu
    lora = Recipe.model_validate({"model": "m", "method": "lora", "dataset": {"hub": "x"}})
    assert precision_problem(lora, "A100") is None


def test_an_fp8_base_weighs_what_an_8bit_one_does_and_half_a_bf16_one():
    shape = KNOWN_MODELS["meta-llama/Llama-2-7b-hf"][1] if "meta-llama/Llama-2-7b-hf" in KNOWN_MODELS else \
        ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
    fp8, int8, bf16 = (weight_bytes(shape, TrainSetup(method=m)) for m in ("fp8", "8bit", "lora"))
    other = (shape.params - shape.linear_params) * 2
    assert fp8 == pytest.approx(int8, rel=0.001)  # the row scales add 0.05 %
    assert fp8 - other == pytest.approx((bf16 - other) / 2, rel=0.001)


def test_fp8_batches_hold_token_counts_the_fp8_matmul_takes():
    """_scaled_mm takes token counts in multiples of 16: an fp8 run pads each micro-batch's rows to that,
    the padding one more ignored document, and so does every method on a GPU (Triton's kernels are
    built once per divisibility by 16); other methods on the CPU keep their rows as long as the longest."""
    from cloudtune.train.attention import document_offsets
    from cloudtune.train.data import IGNORE, Batcher, Encoded, row_width_multiple
    from cloudtune.train.fp8 import TOKEN_MULTIPLE

    docs = [list(range(3, 3 + n)) for n in (37, 50, 21)]
    encoded = Encoded(examples=[(ids, [IGNORE] + ids[1:]) for ids in docs], format="completion")
    padded, exact = (64, [0, 37, 58, 64, 114, 128]), (58, [0, 37, 58, 108, 116])
    for method, device, (width, documents) in (("fp8", "cpu", padded), ("lora", "cuda", padded),
                                               ("qlora", "cuda", padded), ("lora", "cpu", exact)):
        batcher = Batcher(encoded, micro_batch_size=2, max_seq_len=64, packing=True, seed=0, pad_id=2,
                          document_offsets=True, width_multiple=row_width_multiple(method, torch.device(device)))
        batch, tokens = batcher.collate([[0, 2], [1]])
        assert batch["input_ids"].shape == (2, width) and tokens == 108
        assert (batch["labels"] != IGNORE).sum() == 108 - 3  # the padding carries no loss
        offsets, _ = document_offsets(batch["position_ids"])
        assert offsets.tolist() == documents
    assert TOKEN_MULTIPLE == 16


def test_both_matmuls_on_the_fp8_path_compute_the_layer(monkeypatch):
    """The GPU's path, forward x·Wᵀ and input gradient grad·W through `torch._scaled_mm` (which runs on this
    CPU too), with the two Triton kernels (row quantiser, transpose) replaced by eager equivalents: the
    weight's row scales folded into grad's columns and the operands' layouts give what the dense layer
    gives. The kernels themselves are checked on the GPU (bench/fp8_layers.py)."""
    import sys
    import types

    from cloudtune.train import fp8

    def quantise(x, column_scale, floor):
        x = x.float() * (1 if column_scale is None else column_scale)
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=floor) / 448
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale

    kernels = types.SimpleNamespace(quantise_rows=quantise, transposed=lambda matrix: matrix.t().contiguous())
    monkeypatch.setitem(sys.modules, "cloudtune.train.fp8_kernels", kernels)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 2, 48)[:, None])  # output rows five decades apart
    layer = Float8Linear(linear, torch.bfloat16)
    x, grad = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(32, 48, dtype=torch.bfloat16)
    out = fp8.scaled_matmul(x, layer.weight, layer.weight_scale)
    input_grad = fp8.scaled_input_gradient(grad, layer.weight, layer.weight_scale)
    assert out.dtype == input_grad.dtype == torch.bfloat16
    want_out, want_grad = x.float() @ linear.weight.t(), grad.float() @ linear.weight
    assert ((out.float() - want_out).norm(dim=0) / want_out.norm(dim=0)).max() < 0.08  # every output column
    assert (input_grad.float() - want_grad).norm() / want_grad.norm() < 0.08
