"""LoRA as one autograd function per adapted projection, or per group of projections reading one input:
y = base(x) + s·B(A(drop(x))).

peft runs an adapted layer as separate kernels (the base matmul, A, B, the scale, the add; backward the
same and one more add for the two input gradients), and the profile of a 7B QLoRA step puts about 16 %
of the GPU's time in those elementwise adds and muls (bench/results/profile_step.jsonl). Here s is
folded into the r-wide factors, and the adapter's product is the C of the base's matmul where the base is
a plain weight: the narrow h·(sB)ᵀ writes its n × out once and the wide x·Wᵀ adds onto it in its
epilogue, hidden under its compute, where adding h·(sB)ᵀ onto a finished base output reads and writes
n × out once more (the 7B LoRA profile of 2026-12-03 put 7 % of the step in such adds). The input
gradient is built the same way: the adapters' grad_h·A first, the base's grad_y·W added by its matmul.

Projections that read the same input (a decoder layer's q/k/v, its gate/up) run as one group when none
has dropout: one x·Aᵀ for all their A's and one grad_hᵀ·x, each reading x once, and one input gradient
that each projection's matmul adds onto, where autograd would sum three gradients with two more adds.
The first of a group to be called computes every member's output; the others take theirs as long as they
are called with that same, unchanged input.

It saves for backward what peft's modules save (the adapter's input, the r-wide h, the dropout mask) and
never the frozen weight: the base's input gradient is taken from its dense form, for bitsandbytes bases
dequantised again in backward as bitsandbytes' own matmul does. The state dict is peft's, untouched: only
the forward of each LoRA module is replaced, so saving and loading adapters are unchanged.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Sibling projections a Llama-class decoder layer feeds with one tensor; other models run each alone.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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


def plain_linear(base: torch.nn.Module) -> bool:
    """A torch Linear holding its weight as it is (bitsandbytes' layers are Linear subclasses)."""
    return type(base) is torch.nn.Linear


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What peft's module multiplies in: autocast's type where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Member:
    """One adapted projection as a group sees it: its frozen base and its adapter's factors."""

    def __init__(self, module, adapter: str):
        self.module, self.base = module, module.base_layer
        self.lora_a, self.lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        self.scaling = module.scaling[adapter]
        self.rank = self.lora_a.shape[0]


class ComputeFactors:
    """The members' A's stacked (Σr × in) and each s·B, in the compute dtype, made again only once the
    optimizer has changed an A or a B (their version counters move with every in-place update): casting
    and scaling them in every forward and backward cost six small kernels per adapted projection, a fifth
    of a 7B step's kernel launches."""

    def __init__(self):
        self.made_for, self.factors = None, None

    def __call__(self, members: list[Member], dtype: torch.dtype):
        key = (dtype, *((id(m.lora_a), m.lora_a._version, id(m.lora_b), m.lora_b._version, m.scaling)
                        for m in members))
        if key != self.made_for:
            with torch.no_grad():
                a = [m.lora_a.to(dtype) for m in members]
                stacked = a[0] if len(a) == 1 else torch.cat(a)
                self.factors = stacked, [m.lora_b.to(dtype) * m.scaling for m in members]
            self.made_for = key
        return self.factors


class LoraGroup(torch.autograd.Function):
    """The forward and backward of projections reading one x, in one node (see the module docstring);
    returns one output per member. `dropout` > 0 only for a group of one."""

    @staticmethod
    def forward(ctx, x, members, factors, dropout: float, *adapter_weights):
        dtype = compute_dtype(x)
        inputs = x.reshape(-1, x.shape[-1]).to(dtype)
        dropped, keep = inputs, None
        if dropout > 0:
            # F.dropout of ones draws the same mask from the same RNG stream as peft's nn.Dropout(x) would;
            # backward keeps it as bool, one byte an element, as nn.Dropout's own backward does
            scaled = F.dropout(torch.ones_like(inputs), dropout, training=True)
            dropped = inputs * scaled
            keep = scaled != 0
        stacked_a, scaled_b = factors(members, dtype)
        h = dropped @ stacked_a.t()
        outputs = []
        for member, b, h_member in zip(members, scaled_b, h.split([m.rank for m in members], dim=1), strict=True):
            if plain_linear(member.base):
                bias = member.base.bias
                out = h_member @ b.t() if bias is None else torch.addmm(bias.to(dtype), h_member, b.t())
                out.addmm_(inputs, member.base.weight.to(dtype).t())
            else:
                with torch.no_grad():  # exactly what peft's module computes first, quantised kernels included
                    y = member.base(x)
                out = y.reshape(-1, y.shape[-1]).to(dtype).addmm_(h_member, b.t())
            outputs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.save_for_backward(dropped, h, stacked_a, keep, *scaled_b)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a tensor of zeros
        ctx.members, ctx.dropout, ctx.x_shape, ctx.x_dtype = members, dropout, x.shape, x.dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        dropped, h, stacked_a, keep, *scaled_b = ctx.saved_tensors
        members = ctx.members
        grads, grad_h, grad_as, grad_bs = [], [], [], []
        for member, b, h_member, grad_out in zip(members, scaled_b, h.split([m.rank for m in members], dim=1),
                                                 grad_outputs, strict=True):
            if grad_out is None:  # an output the loss does not depend on: its adapter gets no gradient, as in peft
                grads.append(None)
                grad_h.append(torch.zeros_like(h_member))
                grad_bs.append(None)
                continue
            grad = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)
            grads.append(grad)
            grad_h.append(grad @ b)
            grad_bs.append((grad.t() @ h_member).mul_(member.scaling).to(member.lora_b.dtype))
        grad_h = grad_h[0] if len(grad_h) == 1 else torch.cat(grad_h, dim=1)
        grad_stacked_a = grad_h.t() @ dropped
        for member, grad, grad_a in zip(members, grads, grad_stacked_a.split([m.rank for m in members]), strict=True):
            grad_as.append(None if grad is None else grad_a.to(member.lora_a.dtype))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = LoraGroup.input_gradient(members, grads, grad_h, stacked_a, keep, ctx.dropout)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, None, None, *(g for pair in zip(grad_as, grad_bs, strict=True) for g in pair))

    @staticmethod
    def input_gradient(members, grads, grad_h, stacked_a, keep, dropout) -> torch.Tensor:
        """Σ grad_y·W + drop'(grad_h·A): a base with a matmul of its own (fp8) gives its term first, the
        adapters' term follows, and each dense or dequantised base's matmul adds its term onto that."""
        grad_x = None
        for member, grad in zip(members, grads, strict=True):
            own = getattr(member.base, "input_gradient", None)
            if own is not None and grad is not None:
                grad_x = own(grad) if grad_x is None else grad_x.add_(own(grad))
        if keep is not None:
            adapters = (grad_h @ stacked_a).mul_(keep).mul_(1 / (1 - dropout))
            grad_x = adapters if grad_x is None else grad_x.add_(adapters)
        elif grad_x is None:
            grad_x = grad_h @ stacked_a
        else:
            grad_x.addmm_(grad_h, stacked_a)
        for member, grad in zip(members, grads, strict=True):
            if getattr(member.base, "input_gradient", None) is None and grad is not None:
                grad_x.addmm_(grad, dense_weight(member.base, grad.dtype))
        return grad_x


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


def _dropout(module, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0


class SharedInput:
    """Siblings fed one tensor: the outputs computed for the others at the first one's call, kept until
    each is called with that tensor (its identity and version: the same object, not changed since)."""

    def __init__(self, modules: list):
        self.modules = modules
        self.factors = ComputeFactors()
        self.input, self.version, self.waiting = None, None, {}

    def take(self, module, x):
        if self.input is x and x._version == self.version and module in self.waiting:
            output = self.waiting.pop(module)
            if not self.waiting:
                self.input = None
            return output
        return None

    def run(self, module, x):
        """`module`'s output, and its siblings' kept, when they all can run in one group."""
        members = []
        for sibling in self.modules:
            adapter = _fusable_adapter(sibling)
            if adapter is None or _dropout(sibling, adapter) > 0 or sibling.base_layer.in_features != x.shape[-1]:
                continue
            members.append(Member(sibling, adapter))
        if len(members) < 2 or module not in [m.module for m in members]:
            return None
        outputs = LoraGroup.apply(x, members, self.factors, 0.0,
                                  *(w for m in members for w in (m.lora_a, m.lora_b)))
        self.waiting = {m.module: out for m, out in zip(members, outputs, strict=True) if m.module is not module}
        self.input, self.version = x, x._version
        return outputs[[m.module for m in members].index(module)]


def fused_forward(self, x, *args, **kwargs):
    if args or kwargs:
        return self._peft_forward(x, *args, **kwargs)
    group = self._shared_input
    if group is not None:
        output = group.take(self, x)
        if output is None:
            output = group.run(self, x)
        if output is not None:
            return output
    adapter = _fusable_adapter(self)
    if adapter is None:
        return self._peft_forward(x)
    member = Member(self, adapter)
    (output,) = LoraGroup.apply(x, [member], self._compute_factors, _dropout(self, adapter),
                                member.lora_a, member.lora_b)
    return output


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
    """Run every peft LoRA linear of `model` through LoraGroup, siblings of SHARED_INPUT_GROUPS together;
    returns how many were switched."""
    classes = _linear_lora_classes()
    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_GROUPS:
            siblings = [children[name] for name in names if isinstance(children.get(name), classes)]
            if len(siblings) > 1:  # e.g. LoRA on q and v only: those two
                group = SharedInput(siblings)
                for sibling in siblings:
                    sibling._shared_input = group
    for module in model.modules():
        if isinstance(module, classes) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module._compute_factors = ComputeFactors()
            module.__dict__.setdefault("_shared_input", None)
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count
