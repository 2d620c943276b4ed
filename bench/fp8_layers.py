"""The 7B layer shapes on the GPU: the FP8 base's error and speed per projection, and fused LoRA against peft.

  python bench/fp8_layers.py [--tokens 8192]

FP8 (cloudtune/train/fp8.py): each projection's relative output and input-gradient errors against
fp32, and the times of the bf16 matmul, of FP8 with the Triton row quantiser (what the trainer runs), of
FP8 with an eager (unfused) quantiser, of the quantiser alone, and of the input gradient three ways: on
the FP8 tensor cores (what the trainer runs), in bf16 on the dequantised weight, and on a bf16 weight. Fused LoRA
(cloudtune/train/fused_lora.py): for lora (bf16), qlora (nf4), 8bit and fp8 bases with r=16 LoRA under
bf16 autocast, the fused module's output and gradients against peft's, and forward+backward times of
both. Appends to bench/results/fp8_layers.jsonl and bench/results/fused_lora.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, record  # noqa: E402

sys.path.insert(0, str(REPO))
from cloudtune.train import fp8  # noqa: E402
from cloudtune.train.fp8_kernels import quantise_rows, transposed  # noqa: E402
from cloudtune.train.fused_lora import fuse_lora  # noqa: E402

# (in, out) of Llama-2-7B's projections: q/k/v/o, gate/up, down
SHAPES = {"attention": (4096, 4096), "gate_up": (4096, 11008), "down": (11008, 4096)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def median_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def eager_scaled_matmul(x, weight, scale, out_dtype):
    """The naive FP8 forward: amax, divide and cast as separate kernels before the matmul."""
    x_scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=fp8.SCALE_FLOOR) / fp8.E4M3_MAX
    quantised = (x.float() / x_scale).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)
    return torch._scaled_mm(quantised, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=out_dtype)


def fp8_rows(tokens: int) -> None:
    for name, (features_in, features_out) in SHAPES.items():
        fp8_row(name, features_in, features_out, tokens)


def fp8_row(name: str, features_in: int, features_out: int, tokens: int) -> None:
    linear = torch.nn.Linear(features_in, features_out, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=0.02)
    layer = fp8.Float8Linear(linear, torch.bfloat16)
    x = torch.randn(tokens, features_in, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(tokens, features_out, device="cuda", dtype=torch.bfloat16)
    x_e4m3, ones = x.to(fp8.E4M3), torch.ones(tokens, 1, device="cuda")
    with torch.no_grad():
        want = x.float() @ linear.weight.float().t()
        error = relative(layer.matmul(x), want)
        error_bf16 = relative(linear(x), want)
        exact_input_grad = grad.float() @ linear.weight.float()
        input_grad_error = relative(layer.input_gradient(grad), exact_input_grad)
        assert torch.equal(transposed(layer.weight).view(torch.uint8), layer.weight.t().contiguous().view(torch.uint8))
        dequantised_input_grad_error = relative(grad @ layer.dense_weight(torch.bfloat16), exact_input_grad)
        flops = 2 * tokens * features_in * features_out
        times = {
            "bf16_ms": median_ms(lambda: linear(x)),
            "fp8_compiled_ms": median_ms(lambda: layer.matmul(x)),
            "fp8_eager_quant_ms": median_ms(lambda: eager_scaled_matmul(x, layer.weight, layer.weight_scale,
                                                                        torch.bfloat16)),
            "fp8_matmul_only_ms": median_ms(lambda: torch._scaled_mm(
                x_e4m3, layer.weight.t(), scale_a=ones, scale_b=layer.weight_scale.view(1, -1),
                out_dtype=torch.bfloat16)),
            "quantise_rows_ms": median_ms(lambda: quantise_rows(x, None, fp8.SCALE_FLOOR)),
            "quantise_grad_rows_ms": median_ms(lambda: quantise_rows(grad, layer.weight_scale, fp8.SCALE_FLOOR)),
            "transpose_weight_torch_ms": median_ms(lambda: layer.weight.t().contiguous()),
            "transpose_weight_ms": median_ms(lambda: transposed(layer.weight)),
            "input_grad_fp8_ms": median_ms(lambda: layer.input_gradient(grad)),
            "input_grad_dequantised_ms": median_ms(lambda: grad @ layer.dense_weight(torch.bfloat16)),
            "input_grad_bf16_ms": median_ms(lambda: grad @ linear.weight),
        }
    record("fp8_layers", {"projection": name, "tokens": tokens, "in": features_in, "out": features_out,
                          "relative_error_fp8": round(error, 5), "relative_error_bf16": round(error_bf16, 5),
                          "relative_error_input_grad": round(input_grad_error, 5),
                          "relative_error_input_grad_dequantised": round(dequantised_input_grad_error, 5),
                          **{k: round(v, 4) for k, v in times.items()},
                          "fp8_compiled_tflops": round(flops / times["fp8_compiled_ms"] / 1e9, 1),
                          "bf16_tflops": round(flops / times["bf16_ms"] / 1e9, 1),
                          "device": torch.cuda.get_device_name(), "torch": torch.__version__})


class OneProjection(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def base_layer(kind: str, weight: torch.Tensor) -> torch.nn.Module:
    import bitsandbytes as bnb

    features_out, features_in = weight.shape
    linear = torch.nn.Linear(features_in, features_out, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.weight.data.copy_(weight)
    if kind == "lora":
        return linear
    if kind == "fp8":
        return fp8.Float8Linear(linear, torch.bfloat16)
    if kind == "qlora":
        layer = bnb.nn.Linear4bit(features_in, features_out, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(features_in, features_out, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    return layer.cuda()


def adapted(kind: str, weight: torch.Tensor, dropout: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(OneProjection(base_layer(kind, weight)),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["proj"]))
    for module in model.modules():  # as the trainer runs peft under autocast (train/model.py)
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.01)
    return model


def fused_rows(tokens: int) -> None:
    features_in, features_out = SHAPES["gate_up"]
    torch.manual_seed(0)
    weight = torch.randn(features_out, features_in, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, features_in, device="cuda", dtype=torch.bfloat16)
    upstream = torch.randn(tokens, features_out, device="cuda", dtype=torch.bfloat16)
    for kind in ("lora", "qlora", "8bit", "fp8"):
        for dropout in (0.0, 0.1):
            results = {}
            for label in ("peft", "fused"):
                model = adapted(kind, weight, dropout)
                if label == "fused":
                    assert fuse_lora(model) == 1

                def step(model=model):
                    inputs = x.clone().requires_grad_(True)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = model(inputs)
                    out.backward(upstream)
                    return out, inputs.grad

                torch.manual_seed(3)
                out, dx = step()
                grads = {n.split(".")[-3]: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                model.zero_grad()
                results[label] = (out.detach(), dx, grads, median_ms(step))
            (out, dx, grads, peft_ms), (f_out, f_dx, f_grads, fused_ms) = results["peft"], results["fused"]
            record("fused_lora", {"base": kind, "dropout": dropout, "tokens": tokens, "in": features_in,
                                  "out": features_out, "r": 16, "output_rel_diff": round(relative(f_out, out), 5),
                                  "input_grad_rel_diff": round(relative(f_dx, dx), 5),
                                  **{f"grad_{k}_rel_diff": round(relative(f_grads[k], v), 5) for k, v in grads.items()},
                                  "peft_fwd_bwd_ms": round(peft_ms, 4), "fused_fwd_bwd_ms": round(fused_ms, 4),
                                  "speedup": round(peft_ms / fused_ms, 3), "device": torch.cuda.get_device_name(),
                                  "torch": torch.__version__})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--only", choices=("fp8", "fused"), default=None)
    args = parser.parse_args()
    if args.only != "fused":
        fp8_rows(args.tokens)
    if args.only != "fp8":
        fused_rows(args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
