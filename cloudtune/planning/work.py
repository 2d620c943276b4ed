"""The work of a fine-tune: how many tokens it trains, how many the GPU computes on, in which rows.

Packed rows are filled to about 97 %; unpacked micro-batches are as wide as their longest row. A hub
dataset is counted on the training machine, so its tokens are unknown here unless its size is
published (cloudtune/hub.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..datasets import DatasetReport
from ..packing import tokens_read
from ..recipe import Recipe
from .flops import attention_span

PACKING_FILL = 0.97  # first-fit-decreasing packing leaves about 3 % of each row empty
TOKENS_UNCERTAINTY = 0.15  # token counts estimated from characters (no tokenizer offline)


@dataclass(frozen=True)
class Work:
    tokens: int  # tokens the trainer reads, its "tokens" in run.json and the receipt
    processed: float  # tokens the GPU computes on, padding included
    row_tokens: int  # widest row a micro-batch can hold: the peak memory's sequence length
    width: float  # average padded row width
    exact: bool
    note: str = ""
    attention_span: float = 0.0  # keys a token attends to on average, for attention FLOPs (0: width / 2)
    eval_processed: float = 0.0  # tokens the evaluations run forward only, padding included, all of them together
    evaluations: int = 0

    @property
    def span(self) -> float:
        return self.attention_span or self.width / 2


def processed_range(work: Work, passes: float) -> tuple[float, float]:
    """(low, high) processed tokens, each evaluation's counted as the share of a training token its
    forward-only pass costs (1 of a training step's `passes`); ±15 % when the tokens were counted
    without the model's tokenizer."""
    processed = work.processed + work.eval_processed / passes
    if work.exact:
        return processed, processed
    return processed * (1 - TOKENS_UNCERTAINTY), processed * (1 + TOKENS_UNCERTAINTY)


def document_attention_span(report: DatasetReport, cap: int) -> float:
    """Keys a token attends to when attention stays inside each packed document: a token of a
    document of L tokens sees L/2 on average, and longer documents hold more of the tokens, so the
    mean is E[L²] / (2·E[L]) over the documents (from the length percentiles)."""
    lengths = [min(cap, max(1, length)) for length in getattr(report, "length_percentiles", None) or []]
    if len(lengths) < 2:
        return min(cap, report.tokens / max(report.rows, 1)) / 2
    return attention_span((a + b) / 2 for a, b in zip(lengths[:-1], lengths[1:], strict=True))


def attends_per_document(recipe: Recipe) -> bool:
    """Packed rows on a GPU run per-document attention unless the recipe names another kernel."""
    return recipe.training.packing and recipe.training.attention in ("auto", "documents")


def plan_work(recipe: Recipe, report: DatasetReport, micro_batch_size: int | None = None,
              world_size: int = 1) -> Work:
    """The work over all `world_size` GPUs together: each optimizer step takes micro-batch ×
    accumulation rows on every GPU, so an epoch is fewer steps and `max_steps` trains more tokens."""
    spec = recipe.training
    mb = micro_batch_size or spec.micro_batch_size
    cap = spec.max_seq_len
    per_step = spec.gradient_accumulation * world_size  # micro-batches per optimizer step, all GPUs together
    if report.rows == 0:  # a hub dataset of unknown size (its report's size_note says so): counted on the machine
        rows_per_step = mb * per_step
        if not spec.max_steps:
            return Work(0, 0.0, cap, cap, False)
        per_row = cap if spec.packing else cap / 2
        tokens = spec.max_steps * rows_per_step * per_row
        return Work(int(tokens), tokens, cap, per_row, False,
                    f"hub dataset: assumed {per_row:.0f} tokens per row over {spec.max_steps} steps")
    span = document_attention_span(report, cap) if attends_per_document(recipe) else 0.0
    as_trained = report.rows_as_trained(cap, spec.packing)
    if spec.packing:
        rows = len(as_trained) if as_trained else max(1, math.ceil(report.tokens / (cap * PACKING_FILL)))
        width = min(cap, report.tokens / rows / PACKING_FILL)
        processed_per_epoch = rows * width
        row_tokens = min(cap, math.ceil(report.tokens / PACKING_FILL))
    else:
        rows = report.rows
        width = expected_batch_width(report, mb)
        processed_per_epoch = rows * width
        row_tokens = min(cap, report.longest_row_tokens or cap)
    micro_batches = max(1, math.ceil(rows / mb))
    if spec.max_steps:
        total_micro_batches = spec.max_steps * per_step
    else:
        steps = math.ceil((spec.epochs or 1.0) * math.ceil(micro_batches / per_step))
        total_micro_batches = steps * per_step
    epochs = total_micro_batches / micro_batches
    # The trainer's own packing and seeded order over the counted lengths: the tokens it will read.
    tokens = (tokens_read(report.row_lengths, as_trained, mb, spec.seed, total_micro_batches) if as_trained
              else int(report.tokens * epochs))
    evaluations = spec.evaluations(total_micro_batches // per_step) if recipe.evaluates else 0
    # held-out rows are batched as the training's are: packed to ~97 %, or padded as wide as training rows
    padding = 1 / PACKING_FILL if spec.packing else width / max(report.tokens / max(report.rows, 1), 1)
    return Work(tokens=tokens, processed=processed_per_epoch * epochs, row_tokens=row_tokens,
                width=width, exact=report.tokens_exact, attention_span=span,
                eval_processed=evaluations * getattr(report, "eval_tokens", 0) * padding, evaluations=evaluations)


def expected_batch_width(report: DatasetReport, micro_batch_size: int) -> float:
    """Mean padded width of an unpacked micro-batch: the expected longest of its rows.

    With the length percentiles q_0..q_100 the longest of n random rows is at most q_p with
    probability (p/100)^n.
    """
    percentiles = getattr(report, "length_percentiles", None)
    mean = report.tokens / max(report.rows, 1)
    if not percentiles or micro_batch_size <= 1:
        return mean
    n = micro_batch_size
    cdf = [(p / 100) ** n for p in range(len(percentiles))]
    expected = sum((cdf[k] - cdf[k - 1]) * (percentiles[k] + percentiles[k - 1]) / 2 for k in range(1, len(cdf)))
    return max(mean, expected)
