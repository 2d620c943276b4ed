"""The row quantiser of `method: fp8` as one Triton kernel; imported only where CUDA runs (Triton needs it).

Each program loads one whole row into registers once, takes its amax, and writes the e4m3 row and its
scale. torch.compile's kernel for the same expression reads every row twice (its reduction over a
symbolic row length is a loop) and reached ~1.2 TB/s at the 7B shapes, which made quantising an 11008-wide
row a quarter of the FP8 matmul's time (bench/results/fp8_layers.jsonl, 2026-12-02).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)  # a Triton kernel reads only constexpr globals


@triton.jit
def _quantise_rows(x_ptr, column_scale_ptr, out_ptr, scale_ptr, columns, x_stride, out_stride, floor,
                   SCALED_COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < columns
    x = tl.load(x_ptr + row * x_stride + offsets, mask=inside, other=0.0).to(tl.float32)
    if SCALED_COLUMNS:
        x = x * tl.load(column_scale_ptr + offsets, mask=inside, other=0.0)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), floor) / E4M3_MAX
    quantised = tl.clamp(x / scale, -E4M3_MAX, E4M3_MAX)
    tl.store(out_ptr + row * out_stride + offsets, quantised.to(tl.float8e4nv), mask=inside)
    tl.store(scale_ptr + row, scale)


def quantise_rows(x: torch.Tensor, column_scale: torch.Tensor | None,
                  floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale per row as a column) of x·diag(column_scale), for a 2-D CUDA tensor x no
    wider than fp8.WIDEST_ROW."""
    x = x.contiguous()
    rows, columns = x.shape
    out = torch.empty((rows, columns), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(columns)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _quantise_rows[(rows,)](x, x if column_scale is None else column_scale, out, scale, columns, x.stride(0),
                            out.stride(0), floor, SCALED_COLUMNS=column_scale is not None, BLOCK=block,
                            num_warps=warps)
    return out, scale


@triton.jit
def _transpose(matrix_ptr, out_ptr, rows, columns, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = (r[:, None] < rows) & (c[None, :] < columns)
    tile = tl.load(matrix_ptr + r[:, None].to(tl.int64) * columns + c[None, :], mask=inside)
    # transposed in registers (through shared memory), so that the stores too run along memory
    tl.store(out_ptr + c[:, None].to(tl.int64) * rows + r[None, :], tl.trans(tile), mask=tl.trans(inside))


def transposed(matrix: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a contiguous 2-D matrix's transpose. For the e4m3 weight this tiled kernel
    moves ~6× the bytes per second of torch's `.t().contiguous()` (bench/results/fp8_layers.jsonl)."""
    rows, columns = matrix.shape
    out = torch.empty((columns, rows), device=matrix.device, dtype=matrix.dtype)
    block = 64
    _transpose[(triton.cdiv(rows, block), triton.cdiv(columns, block))](matrix, out, rows, columns, BLOCK=block,
                                                                         num_warps=4)
    return out
