"""Fused LoRA (cloudtune/train/fused_lora.py) computes what peft's modules compute: outputs, the input's
gradient and the adapters' gradients, for a bf16/fp32 base, a 4-bit and an 8-bit bitsandbytes base (which
run on this CPU), with dropout off and on; and over the tiny Llama with LoRA on every linear layer."""
from __future__ import annotations

import copy

import pytest
import torch

from cloudtune.train.fused_lora import LoraGroup, fuse_lora


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class OneProjection(torch.nn.Module):
    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def quantised_base(kind: str, weight: torch.Tensor) -> torch.nn.Module:
    out_features, in_features = weight.shape
    if kind == "lora":
        base = torch.nn.Linear(in_features, out_features, bias=False)
        base.weight.data.copy_(weight)
        return base
    import bitsandbytes as bnb

    if kind == "qlora":
        base = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                                 quant_type="nf4")
        base.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    else:
        base = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0)
        base.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return base.to("cpu")  # bitsandbytes quantises on the move to a device


def adapted(kind: str, dropout: float, seed: int = 0):
    """One projection of a random weight under peft LoRA, with B random (peft starts it at zero)."""
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 64, generator=generator) / 8
    model = get_peft_model(OneProjection(quantised_base(kind, weight)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"]))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) / 4)
    return model


def step(model, x: torch.Tensor, upstream: torch.Tensor, seed: int):
    """Output and gradients (input, then each adapter weight by name) of one forward and backward."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask for both
    out = model(x)
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("kind", ["lora", "qlora", "8bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_fused_projection_matches_peft(kind, dropout):
    reference, fused = adapted(kind, dropout), adapted(kind, dropout)
    assert fuse_lora(fused) == 1
    x, upstream = torch.randn(3, 7, 64), torch.randn(3, 7, 48)
    want_out, want_dx, want_grads = step(reference, x, upstream, seed=5)
    got_out, got_dx, got_grads = step(fused, x, upstream, seed=5)
    assert relative(got_out, want_out) < 1e-5
    assert relative(got_dx, want_dx) < 1e-5
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 2
    for name, want in want_grads.items():
        assert relative(got_grads[name], want) < 1e-5, name
    if dropout:  # the mask is really applied: another draw gives other adapter gradients
        _, _, other = step(fused, x, upstream, seed=6)
        assert relative(other["base_model.model.proj.lora_A.default.weight"],
                        want_grads["base_model.model.proj.lora_A.default.weight"]) > 1e-2


def test_under_bf16_autocast_the_fused_projection_rounds_like_peft():
    # the GPU path: fp32 adapters, bf16 matmuls; the fused one rounds once where peft rounds twice
    reference, fused = adapted("lora", 0.0), adapted("lora", 0.0)
    fuse_lora(fused)
    x, upstream = torch.randn(3, 7, 64), torch.randn(3, 7, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (want_out, want_dx, want_grads), (got_out, got_dx, got_grads) = (
            step(model, x, upstream, seed=5) for model in (reference, fused))
    assert got_out.dtype == want_out.dtype == torch.bfloat16 and got_dx.dtype == torch.float32
    assert relative(got_out, want_out) < 1e-2 and relative(got_dx, want_dx) < 1e-2
    for name, want in want_grads.items():
        assert got_grads[name].dtype == torch.float32 and relative(got_grads[name], want) < 2e-2, name


def test_the_8bit_forward_stays_bitsandbytes_own():
    # backward takes grad·W from the dequantised int8 weight; forward is LLM.int8() itself, outliers and all
    reference, fused = adapted("8bit", 0.0), adapted("8bit", 0.0)
    fuse_lora(fused)
    x = torch.randn(2, 64) * 10
    with torch.no_grad():
        assert torch.equal(fused.base_model.model.proj.base_layer(x), reference.base_model.model.proj.base_layer(x))


def recorded_group_sizes(monkeypatch) -> list[int]:
    """How many projections each LoraGroup call ran, in call order."""
    sizes = []
    apply = LoraGroup.apply

    def recording(x, members, *rest):
        sizes.append(len(members))
        return apply(x, members, *rest)

    monkeypatch.setattr(LoraGroup, "apply", recording)
    return sizes


@pytest.mark.parametrize(("dropout", "targets", "adapted_per_layer", "groups_per_layer"), [
    (0.0, "all-linear", 7, [3, 1, 2, 1]),
    (0.1, "all-linear", 7, [1] * 7),
    (0.0, ["q_proj", "v_proj", "up_proj"], 3, [2, 1]),
])
def test_the_tiny_llama_trains_the_same_fused_as_under_peft(ct_home, monkeypatch, dropout, targets,
                                                            adapted_per_layer, groups_per_layer):
    """Without dropout each layer's adapted q/k/v and gate/up run as one group each (a projection whose
    siblings are not adapted runs alone); with dropout, each projection alone (each draws its own mask,
    as peft's modules do)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cloudtune.train.model import tiny_llama_dir

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets)
    reference = get_peft_model(base, config)
    for name, parameter in reference.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 2 * adapted_per_layer  # of both decoder layers; never the head
    reference.train(), fused.train()
    ids = torch.randint(3, 259, (2, 24))
    sizes = recorded_group_sizes(monkeypatch)
    results = []
    for model in (reference, fused):
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert sizes == groups_per_layer * 2
    (want_loss, want), (got_loss, got) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        assert relative(got[name], grad) < 1e-4, name
    reference.eval(), fused.eval()  # eval: dropout off; a disabled adapter runs peft's own forward
    with torch.no_grad():
        assert relative(fused(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-5
        with fused.disable_adapter(), reference.disable_adapter():
            plain = reference(input_ids=ids).logits
            assert torch.equal(fused(input_ids=ids).logits, plain)
        assert relative(fused(input_ids=ids).logits, plain) > 1e-3  # and the adapters are back on


def test_the_compute_copies_of_the_adapters_follow_every_update_of_them():
    """Under autocast the fused module multiplies with bf16 copies of A and s·B, made once per change of
    A or B: each optimizer step, and a load of other weights, must reach the next forward."""
    reference, fused = adapted("lora", 0.0), adapted("lora", 0.0)
    fuse_lora(fused)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
                  for m in (reference, fused)]
    x, upstream = torch.randn(3, 7, 64), torch.randn(3, 7, 48)
    before = None
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (want_out, _, _), (got_out, _, _) = (step(model, x, upstream, seed=5) for model in (reference, fused))
        assert relative(got_out, want_out) < 1e-2
        assert before is None or relative(got_out, before) > 1e-2  # the step changed what it computes
        before = got_out
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    fused.load_state_dict(adapted("lora", 0.0, seed=9).state_dict())
    reloaded = adapted("lora", 0.0, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert relative(fused(x), reloaded(x)) < 1e-2


class CrossAttentionLike(torch.nn.Module):
    """q/k/v named as in a decoder layer, but k and v read another tensor, and k's output goes unused."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        for name in ("q_proj", "k_proj", "v_proj"):
            layer = torch.nn.Linear(16, 12, bias=name == "v_proj")
            layer.weight.data = torch.randn(12, 16, generator=generator) / 4
            setattr(self, name, layer)

    def forward(self, x, memory):
        q = self.q_proj(x)
        self.k_proj(memory)
        return q * self.v_proj(memory)


def test_siblings_fed_other_tensors_each_get_their_own_input(monkeypatch):
    """The group's outputs computed at q's call are for q's input: k and v, called with another tensor,
    compute theirs again; an output the loss does not use leaves its adapter without a gradient, as peft
    does, rather than with a zero one (which an optimizer would still step on)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    reference = get_peft_model(CrossAttentionLike(), config)
    for name, parameter in reference.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.3)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 3
    sizes = recorded_group_sizes(monkeypatch)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    results = []
    for model in (reference, fused):
        out = model(x, memory)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want_out, want), (got_out, got) = results
    assert sizes == [3, 3]
    assert relative(got_out, want_out) < 1e-5
    for name, grad in want.items():
        assert (got[name] is None) == (grad is None) and (grad is None or relative(got[name], grad) < 1e-5), name
    assert got["base_model.model.k_proj.lora_A.default.weight"] is None
