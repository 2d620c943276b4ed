"""Rows -> token ids with loss masks -> micro-batches, packed without cross-document attention.

Packing puts several documents in one row; each document's position ids restart at 0, and the
attention implementation reads those restarts as document boundaries, so no token sees another
document. The first token of each document gets no loss: predicting it from the previous document
would teach nonsense.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .. import formats
from ..datasets import iter_rows
from ..errors import CloudtuneError
from ..recipe import Recipe

IGNORE = -100


@dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels) per document
    format: str
    truncated: int = 0
    trained_tokens: int = 0  # tokens that carry a loss, summed over documents
    rows: int = 0
    notes: list[str] = field(default_factory=list)


def load_rows(recipe: Recipe) -> list[tuple[str, dict]]:
    file = recipe.dataset_file()
    if file is not None:
        rows = list(iter_rows(file))
    else:
        from datasets import load_dataset

        spec = recipe.dataset
        dataset = load_dataset(spec.hub, spec.subset, split=spec.split)
        rows = [(f"{spec.hub}[{i}]", dict(row)) for i, row in enumerate(dataset)]
    if recipe.dataset.max_rows:
        rows = rows[: recipe.dataset.max_rows]
    if not rows:
        raise CloudtuneError("the dataset has no rows.", "Add training examples.")
    return rows


def chat_renderer(tokenizer) -> formats.ChatRenderer:
    if getattr(tokenizer, "chat_template", None):
        return lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=gen)
    return formats.fallback_chat


def encode(recipe: Recipe, tokenizer, rows: list[tuple[str, dict]]) -> Encoded:
    columns = recipe.dataset.columns
    fmt = recipe.dataset.format
    if fmt == "auto":
        fmt = formats.detect_format(rows[0][1], columns)
    chat = chat_renderer(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    cap = recipe.training.max_seq_len
    out = Encoded(examples=[], format=fmt)
    for where, row in rows:
        try:
            prompt, answer = formats.render(row, fmt, columns, chat)
        except formats.RowError as exc:
            raise CloudtuneError(f"{where}: {exc}.", "Fix that row or map columns under dataset.columns.") from None
        prompt_ids = bos + (tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        ids = prompt_ids + answer_ids
        if recipe.dataset.completions_only:
            labels = [IGNORE] * len(prompt_ids) + answer_ids
        else:
            labels = list(ids)
        if len(ids) > cap:
            out.truncated += 1
            ids, labels = ids[:cap], labels[:cap]
        labels[0] = IGNORE  # nothing predicts a document's first token
        out.trained_tokens += sum(1 for label in labels if label != IGNORE)
        out.examples.append((ids, labels))
    out.rows = len(out.examples)
    if out.truncated:
        out.notes.append(f"{out.truncated} of {out.rows} rows were longer than max_seq_len={cap} and were truncated")
    return out


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: group document indices into rows of at most `capacity` tokens.

    Deterministic for a given dataset, so every epoch (and a resumed run) has the same row count.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class Batcher:
    """Yields the micro-batches of an epoch in a seeded order; resumable by batch index."""

    encoded: Encoded
    micro_batch_size: int
    max_seq_len: int
    packing: bool
    seed: int
    pad_id: int

    def __post_init__(self) -> None:
        lengths = [len(ids) for ids, _ in self.encoded.examples]
        self.rows = pack(lengths, self.max_seq_len) if self.packing else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.micro_batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000003 + epoch).shuffle(order)
        for b in range(start, len(self)):
            picked = [self.rows[i] for i in order[b * self.micro_batch_size:(b + 1) * self.micro_batch_size]]
            yield self.collate(picked)

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        examples = self.encoded.examples
        width = max(sum(len(examples[i][0]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                ids, labs = examples[i]
                n = len(ids)
                input_ids[r, at:at + n] = torch.tensor(ids)
                labels[r, at:at + n] = torch.tensor(labs)
                position_ids[r, at:at + n] = torch.arange(n)
                attention_mask[r, at:at + n] = 1
                at += n
            # padding continues the positions so it reads as one more (ignored) document
            position_ids[r, at:] = torch.arange(width - at)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if not self.packing:
            batch["attention_mask"] = attention_mask
        return batch
