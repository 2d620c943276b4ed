"""`method: fp8`: the frozen base's decoder linears stored in float8 e4m3, one scale per output row.

Half the bytes of a bf16 base. On GPUs with FP8 tensor cores (compute capability 8.9: Ada, Hopper,
Blackwell) both of the base's matmuls run there through `torch._scaled_mm` with row-wise scales: the
forward x·Wᵀ, each token's activation row quantised with its own scale, and the input gradient grad·W,
the weight's row scales folded into grad's columns before grad's rows are quantised the same way (W's
transposed copy is made per call: keeping one would cost the bytes FP8 saves). Quantising is one Triton
kernel a row (fp8_kernels.py), since a separate amax, divide and cast per call costs more than FP8 saves
(bench/results/fp8_layers.jsonl). Elsewhere (the CPU, where the tests run) both run in 16/32 bits on the
dequantised weight: the same function, slower.
"""
from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
SCALE_FLOOR = 1e-12  # an all-zero row keeps a finite scale
WIDEST_ROW = 32768  # the widest row the quantiser holds in one program's registers
# _scaled_mm takes token counts in multiples of 16; a micro-batch of packed rows of any other length
# would take the dequantised path in every layer (seen: half the steps of a benchmark run)
TOKEN_MULTIPLE = 16


def quantise_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 matrix, fp32 scale per row) with matrix ≈ quantised · scale[:, None]."""
    scale = matrix.abs().amax(dim=1).float().clamp(min=SCALE_FLOOR) / E4M3_MAX
    return (matrix.float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_matmuls(device: torch.device) -> bool:
    """Whether this device multiplies in float8 e4m3fn: NVIDIA at compute capability 8.9 or later (ROCm's
    FP8 is another format, e4m3fnuz)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def _compiled_dequantiser():
    # one pass (read 1 byte, write 2) instead of eager's three with an fp32 temporary, which made the
    # input gradient 25 % slower than bf16's at the 7B shapes (bench/results/fp8_layers.jsonl, 2026-12-02)
    def dequantise(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (weight.float() * scale[:, None]).to(dtype)

    return torch.compile(dequantise)


@functools.cache
def _ones(columns: int, device: torch.device) -> torch.Tensor:
    return torch.ones(1, columns, device=device)


def scaled_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (n × in, bf16) @ (weight · scale)ᵀ on the FP8 tensor cores, row-wise scales on both sides."""
    from .fp8_kernels import quantise_rows as quantise

    quantised, x_scale = quantise(x, None, SCALE_FLOOR)
    return torch._scaled_mm(quantised, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)


def scaled_input_gradient(grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad (n × out, bf16) @ (weight · scale) on the FP8 tensor cores: grad·diag(scale) is quantised by
    rows, and _scaled_mm's second operand must be column-major, which for W is its transposed copy."""
    from .fp8_kernels import quantise_rows as quantise
    from .fp8_kernels import transposed

    quantised, grad_scale = quantise(grad, scale, SCALE_FLOOR)
    column_major = transposed(weight).t()
    return torch._scaled_mm(quantised, column_major, scale_a=grad_scale,
                            scale_b=_ones(weight.shape[1], grad.device), out_dtype=grad.dtype)


class _Float8Matmul(torch.autograd.Function):
    """y = x·Wᵀ for a frozen e4m3 W; backward gives x its gradient only (W is frozen)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layer.input_gradient(grad), None


class Float8Linear(torch.nn.Linear):
    """A frozen linear layer in float8 e4m3 with per-output-row scales. A subclass of nn.Linear so that
    peft adapts it like any linear layer; `compute_dtype` tells peft the adapters' dtype, as for 4-bit."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        quantised, scale = quantise_rows(linear.weight.detach())
        self.weight = torch.nn.Parameter(quantised, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.compute_dtype = compute_dtype
        # _scaled_mm takes sizes in multiples of 16 (the token count is checked per call); each side's
        # rows are quantised, forward and backward
        self.fp8_shapes = all(n % TOKEN_MULTIPLE == 0 and n <= WIDEST_ROW
                              for n in (self.in_features, self.out_features))

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight.is_cuda:
            return _compiled_dequantiser()(self.weight, self.weight_scale, dtype)
        return (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def _on_fp8_cores(self, flat: torch.Tensor) -> bool:
        # row-wise scaled _scaled_mm writes bf16 only
        return self.fp8_shapes and flat.shape[0] > 0 and flat.shape[0] % TOKEN_MULTIPLE == 0 \
            and flat.dtype == torch.bfloat16 and fp8_matmuls(flat.device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self._dtype(x))
        if self._on_fp8_cores(flat):
            out = scaled_matmul(flat, self.weight, self.weight_scale)
        else:  # the dequantised fallback: no FP8 tensor cores, or a shape _scaled_mm refuses
            out = flat @ self.dense_weight(flat.dtype).t()
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def input_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1, grad.shape[-1])
        if self._on_fp8_cores(flat):
            out = scaled_input_gradient(flat, self.weight, self.weight_scale)
        else:
            out = flat @ self.dense_weight(flat.dtype)
        return out.view(*grad.shape[:-1], self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Float8Matmul.apply(x, self)
        return self.matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3 per-row scales"


def quantise_decoder_linears(model, compute_dtype: torch.dtype, device: torch.device | None = None) -> int:
    """Replace every linear layer inside the decoder layers with a Float8Linear on `device` (default: where
    the layer is), each moved there just before it is quantised; the embeddings and the LM head stay in
    16 bits, as bitsandbytes leaves them. Returns how many were replaced."""
    from .model import decoder_layers

    count = 0
    for layer in decoder_layers(model):
        for name, child in list(layer.named_modules()):
            if type(child) is torch.nn.Linear:
                parent_name, _, attribute = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, attribute, Float8Linear(child.to(device) if device else child, compute_dtype))
                count += 1
    return count


def layer_errors(model, reference, inputs: torch.Tensor) -> dict[str, float]:
    """Relative output error ‖fp8(x) − bf16(x)‖/‖bf16(x)‖ of each quantised projection of `model`
    against the same projection of `reference` (an unquantised copy), on the inputs each projection
    actually sees when `reference` runs on `inputs`."""
    seen: dict[str, torch.Tensor] = {}
    quantised = {name: m for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    hooks = [reference.get_submodule(name).register_forward_hook(
        functools.partial(lambda key, _m, args, _out: seen.__setitem__(key, args[0].detach()), name))
        for name in quantised]
    try:
        with torch.no_grad():
            reference(input_ids=inputs)
    finally:
        for hook in hooks:
            hook.remove()
    errors = {}
    with torch.no_grad():
        for name, layer in quantised.items():
            want = reference.get_submodule(name)(seen[name]).float()
            got = layer(seen[name]).float()
            errors[name] = ((got - want).norm() / want.norm()).item()
    return errors

