"""Attention over packed rows: what each kernel costs, forward + backward, on this GPU.

  python bench/attention_kernels.py [--rows 2] [--width 4096]

Rows hold guanaco-like documents (lognormal lengths, median ~350, capped at 1024) packed end to end,
as cloudtune's trainer packs them. Compares SDPA with the dense block-diagonal mask that transformers
builds from packed position ids, PyTorch's varlen flash attention with per-document offsets, and a
plain causal flash call over whole rows (which would attend across documents: a lower bound only).
Appends its figures to bench/results/attention_kernels.jsonl.
"""
from __future__ import annotations

import argparse
import inspect
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402


def packed_lengths(rows: int, width: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        lengths, room = [], width
        while room > 0:
            n = min(1024, max(16, int(rng.lognormvariate(5.86, 0.8))), room)
            lengths.append(n)
            room -= n
        out.append(lengths)
    return out


def timed(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    from torch.nn.attention.varlen import varlen_attn

    causal_kw = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
                 else {"window_size": (-1, 0)})
    rows, width, heads, dim = args.rows, args.width, args.heads, args.head_dim
    lengths = packed_lengths(rows, width)
    device, dtype = torch.device("cuda"), torch.bfloat16
    q, k, v = (torch.randn(rows, heads, width, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(rows, heads, width, dim, device=device, dtype=dtype)

    doc = torch.cat([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths]).view(rows,
                                                                                                           width)
    same_doc = doc[:, :, None] == doc[:, None, :]
    mask = (same_doc & torch.ones(width, width, dtype=torch.bool).tril()).to(device)[:, None]
    flat = [n for ls in lengths for n in ls]
    cu = torch.tensor([0] + flat, dtype=torch.int32).cumsum(0).to(device=device, dtype=torch.int32)
    longest = max(flat)

    def dense():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    def as_tokens(x):
        return x.transpose(1, 2).reshape(rows * width, heads, dim)

    def varlen_out():
        return varlen_attn(as_tokens(q), as_tokens(k), as_tokens(v), cu, cu, longest, longest, **causal_kw)

    def varlen():
        varlen_out().backward(as_tokens(grad))

    def whole_rows():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = varlen_out().view(rows, width, heads, dim).transpose(1, 2)
        max_diff = (reference - got).abs().max().item()
    row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, width=width, heads=heads,
               head_dim=dim, documents=len(flat), dense_mask_ms=round(timed(dense), 3),
               varlen_ms=round(timed(varlen), 3), causal_whole_rows_ms=round(timed(whole_rows), 3),
               varlen_vs_dense_max_diff=max_diff)
    record("attention_kernels", row)
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
