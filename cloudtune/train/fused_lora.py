"""LoRA as one autograd function per adapted projection: y = base(x) + s·B(A(drop(x))).

peft runs an adapted layer as separate kernels (the base matmul, A, B, the scale, the add; backward the
same and one more add for the two input gradients), and the profile of a 7B QLoRA step puts about 16 %
of the GPU's time in those elementwise adds and muls (bench/results/profile_step.jsonl). Here the scale
and the add go into B's matmul (an addmm onto the base output), s is folded into the r-wide factors, and
the input gradient is one tensor: the frozen base's grad_y·W with grad_h·A added onto it in place.

It saves for backward what peft's modules save (the adapter's input, the r-wide h, the dropout mask) and
never the frozen weight: the base's input gradient is taken from its dense form, for bitsandbytes bases
dequantised again in backward as bitsandbytes' own matmul does. The state dict is peft's, untouched: only
the forward of each LoRA module is replaced, so saving and loading adapters are unchanged.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base layer's weight as an (out × in) matrix in `dtype`, whatever it is stored in."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit (nf4/fp4)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)
    if weight.dtype == torch.int8:  # bitsandbytes LLM.int8(): row-wise absmax scales over 127
        # the layer's first forward moves the scales from the weight into its matmul state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        return weight.data.to(dtype).mul_(scales.unsqueeze(1).to(dtype) / 127)
    return weight.to(dtype)


def input_gradient(base: torch.nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """grad·W for the frozen base (n × out → n × in); cloudtune's own quantised layers (fp8) know theirs."""
    own = getattr(base, "input_gradient", None)
    return own(grad) if own is not None else grad @ dense_weight(base, grad.dtype)


class LoraProjection(torch.autograd.Function):
    """The adapted projection's forward and backward in one node (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling: float, dropout: float, factors):
        with torch.no_grad():
            y = base(x)  # exactly what peft's module computes first, quantised kernels and autocast included
        dtype = y.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        keep = None
        if dropout > 0:
            # F.dropout of ones draws the same mask from the same RNG stream as peft's nn.Dropout(x) would;
            # backward keeps it as bool, one byte an element, as nn.Dropout's own backward does
            scaled = F.dropout(torch.ones_like(flat), dropout, training=True)
            flat = flat * scaled
            keep = scaled != 0
        a, scaled_b = factors(dtype)
        h = flat @ a.t()
        out = y.reshape(-1, y.shape[-1]).addmm_(h, scaled_b.t())
        ctx.save_for_backward(flat, h, a, scaled_b, keep)
        ctx.base, ctx.scaling, ctx.dropout, ctx.x_shape, ctx.x_dtype = base, scaling, dropout, x.shape, x.dtype
        ctx.factor_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*y.shape)

    @staticmethod
    def backward(ctx, grad_out):
        flat, h, a, scaled_b, keep = ctx.saved_tensors
        a_dtype, b_dtype = ctx.factor_dtypes
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)
        grad_h = grad @ scaled_b  # n × r
        grad_a = (grad_h.t() @ flat).to(a_dtype)
        grad_b = (grad.t() @ h).mul_(ctx.scaling).to(b_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(ctx.base, grad)
            if keep is None:
                grad_x.addmm_(grad_h, a)
            else:
                grad_x.addcmul_(grad_h @ a, keep, value=1 / (1 - ctx.dropout))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


class ComputeFactors:
    """A and s·B in the compute dtype, made again only once the optimizer has changed A or B (their
    version counters move with every in-place update): casting and scaling them in every forward and
    backward cost six small kernels per adapted projection, a fifth of a 7B step's kernel launches."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        self.lora_a, self.lora_b, self.scaling = lora_a, lora_b, scaling
        self.made_for, self.factors = None, None

    def __call__(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, self.lora_a._version, self.lora_b._version, self.scaling)
        if key != self.made_for:
            with torch.no_grad():
                self.factors = self.lora_a.to(dtype), self.lora_b.to(dtype) * self.scaling
            self.made_for = key
        return self.factors


def _fusable_adapter(module) -> str | None:
    """The one active plain-LoRA adapter of a peft module, or None when peft's own forward must run
    (adapters off or merged, several active, DoRA or another variant, a bias on B)."""
    if module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    if module.lora_B[active[0]].bias is not None or getattr(module, "use_dora", {}).get(active[0], False):
        return None
    return active[0]


def fused_forward(self, x, *args, **kwargs):
    adapter = None if args or kwargs else _fusable_adapter(self)
    if adapter is None:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    lora_a, lora_b, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
    factors = self._compute_factors.get(adapter)
    if factors is None or factors.lora_a is not lora_a or factors.lora_b is not lora_b:
        factors = self._compute_factors[adapter] = ComputeFactors(lora_a, lora_b, scaling)
    factors.scaling = scaling
    return LoraProjection.apply(x, lora_a, lora_b, self.base_layer, scaling, p, factors)


def _linear_lora_classes() -> tuple[type, ...]:
    """peft's LoRA wrappers of a linear base: plain, and bitsandbytes' 4- and 8-bit where installed."""
    from peft.tuners.lora import layer

    classes = [layer.Linear]
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return tuple(classes)
    classes += [getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)]
    return tuple(classes)


def fuse_lora(model) -> int:
    """Run every peft LoRA linear of `model` through LoraProjection; returns how many were switched."""
    classes = _linear_lora_classes()
    count = 0
    for module in model.modules():
        if isinstance(module, classes) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module._compute_factors = {}
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count
