"""Attention that sees one document at a time, for packed rows.

transformers reads packed position ids as a dense block-diagonal mask and hands it to SDPA, which then
runs its masked kernel over whole rows: at 4096-token rows of ~350-token documents that is most of
the attention work spent on pairs the mask throws away (bench/results/attention_kernels.jsonl).
Here every row is cut into its documents by offsets the batcher computes on the CPU, and PyTorch's
varlen flash kernel attends within each document only. Padding at the end of a row counts as one
more document whose labels are ignored, so unpacked batches need no padding mask either.
"""
from __future__ import annotations

import inspect
import itertools
from functools import cache

import torch
import torch.nn.functional as F

DOCUMENT_ATTENTION = "documents"  # the recipe value and the name transformers knows it by


@cache
def _varlen_kernel():
    """PyTorch's varlen flash attention and how to call it, or None where it cannot run or misbehaves."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    parameters = inspect.signature(varlen_attn).parameters
    # torch 2.10 spells causality is_causal; later releases as a (left, right) window.
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    kernel = (varlen_attn, causal, "scale" in parameters)
    return kernel if _agrees_with_sdpa(kernel) else None


def _agrees_with_sdpa(kernel) -> bool:
    """The kernel is young in PyTorch: run it once here, forward and backward, against SDPA per document."""
    varlen_attn, causal, _ = kernel
    try:
        generator = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(24, 2, 64, device="cuda", dtype=torch.bfloat16, generator=generator,
                               requires_grad=True) for _ in range(3))
        offsets = torch.tensor([0, 10, 24], device="cuda", dtype=torch.int32)
        out = varlen_attn(q, k, v, offsets, offsets, 14, 14, **causal)
        out.float().square().sum().backward()
        expected = torch.cat([F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in (q, k, v)),
                                                             is_causal=True).transpose(0, 1)
                              for s, e in ((0, 10), (10, 24))])
        return bool((out - expected).abs().max() < 2e-2) and bool(torch.isfinite(q.grad).all())
    except Exception:  # noqa: BLE001 - whatever fails here, SDPA still works
        return False


def available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen_kernel() is not None


def implementation(choice: str, device: torch.device) -> str:
    """The transformers attn_implementation for the recipe's `training.attention`."""
    if choice == DOCUMENT_ATTENTION or (choice == "auto" and available(device)):
        register()
        return DOCUMENT_ATTENTION
    return "sdpa" if choice == "auto" else choice


def document_offsets(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document starts over the flattened rows, and the longest document, from position ids.

    A document starts wherever the position restarts at 0; every row starts one.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    bounds = torch.cat([starts, torch.tensor([flat.numel()])])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention interface: query (B, H, S, D) -> output (B, S, H, D), no weights."""
    if cu_seq_lens_q is None:  # generation: whole rows with their padding mask, as plain SDPA does it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise RuntimeError(f"{DOCUMENT_ATTENTION} attention has no dropout; set the model's attention_dropout to 0")
    rows, heads, width, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(rows * width, x.shape[1], dim) for x in (query, key, value))
    kernel = _varlen_kernel() if query.is_cuda else None
    if kernel is not None:
        varlen_attn, causal, takes_scale = kernel
        if k.shape[1] != heads:  # grouped-query attention: the kernel wants one key head per query head
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
        if scaling is not None and scaling != dim ** -0.5 and not takes_scale:
            raise RuntimeError("this torch's varlen attention cannot take the model's attention scale")
        scale = {"scale": scaling} if takes_scale else {}
        offsets = cu_seq_lens_q.to(q.device, torch.int32)
        out = varlen_attn(q, k, v, offsets, offsets, max_length_q, max_length_q, **causal, **scale)
    else:
        # Without the flash kernel (CPU), the same result one document at a time.
        bounds = cu_seq_lens_q.tolist()
        pieces = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                 v[s:e].transpose(0, 1), is_causal=True, scale=scaling,
                                                 enable_gqa=k.shape[1] != heads).transpose(0, 1)
                  for s, e in itertools.pairwise(bounds)]
        out = torch.cat(pieces)
    return out.view(rows, width, heads, dim), None


def _mask(*args, attention_mask=None, **kwargs):
    """Training batches carry document offsets and no padding mask; generation keeps SDPA's mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


@cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
    AttentionMaskInterface.register(DOCUMENT_ATTENTION, _mask)
