"""Rows -> token ids with loss masks -> micro-batches, packed without cross-document attention.

Packing puts several documents in one row; each document's position ids restart at 0, and the
attention implementation reads those restarts as document boundaries, so no token sees another
document. The first token of each document gets no loss: predicting it from the previous document
would teach nonsense.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .. import formats
from ..datasets import dataset_rows, render_rows
from ..errors import CloudtuneError
from ..packing import epoch_order, layout
from ..recipe import Recipe
from .attention import document_offsets

IGNORE = -100


def row_width_multiple(method: str, device: torch.device) -> int:
    """What the batcher pads each micro-batch's rows to a multiple of.

    On a GPU, 16 for every method: fp8's `_scaled_mm` takes no other token count, and Triton builds a
    kernel once for each integer argument that is, or is not, a multiple of 16, so Liger's kernels (they
    take the token count) were built again, at 0.1-0.4 s each, whenever a step's rows first came to the
    other kind (bench/results/profile_step.jsonl). The padding costs under 16 tokens a row.
    """
    from .fp8 import TOKEN_MULTIPLE

    return TOKEN_MULTIPLE if method == "fp8" or device.type == "cuda" else 1


def document_fields(position_ids: torch.Tensor) -> dict:
    """What attention.document_attention reads from a batch: where each document starts, the longest."""
    offsets, longest = document_offsets(position_ids)
    return dict(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest)


def on_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors copied to `device` (asynchronously where the copy can be)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels) per document
    format: str
    truncated: int = 0
    trained_tokens: int = 0  # tokens that carry a loss, summed over documents
    rows: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Every token the model reads in one epoch, as `validate` and `cost` count them."""
        return sum(len(ids) for ids, _ in self.examples)


def load_rows(recipe: Recipe) -> list[tuple[str, dict]]:
    file = recipe.dataset_file()
    rows = list(dataset_rows(recipe)) if file is not None else _hub_rows(recipe)[: recipe.dataset.max_rows]
    if not rows:
        where = file or f"dataset.hub '{recipe.dataset.hub}'"
        raise CloudtuneError(f"{where}: the dataset has no rows.", "Add training examples.")
    return rows


def _hub_rows(recipe: Recipe) -> list[tuple[str, dict]]:
    from datasets import load_dataset

    spec = recipe.dataset
    try:
        dataset = load_dataset(spec.hub, spec.subset, split=spec.split, data_files=spec.data_files)
    except Exception as exc:  # noqa: BLE001 - unknown id, missing split, gated repo: all fixable in the recipe
        raise CloudtuneError(f"dataset.hub '{spec.hub}' could not be loaded: {type(exc).__name__}: {exc}",
                             "Check the id, subset, split and data_files; a gated or private dataset needs "
                             "HF_TOKEN in secrets.") from None
    name = spec.hub if spec.data_files is None else f"{spec.hub}:{spec.data_files}"
    return [(f"{name} {spec.split} row {i}", dict(row)) for i, row in enumerate(dataset)]


def chat_renderer(tokenizer) -> formats.ChatRenderer:
    if getattr(tokenizer, "chat_template", None):
        return lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=gen)
    return formats.fallback_chat


def tokenize(tokenizer, pieces: list[formats.Segment]) -> tuple[list[int], list[bool]]:
    """Token ids of a document with, per token, whether it belongs to an answer.

    The text is tokenized in one piece, as it will be at inference; tokenizing prompt and answer
    apart would change the tokens at the seam (SentencePiece adds a space to each start). A token
    belongs to the piece holding its last character, so a token straddling the seam is an answer's.
    BOS and EOS are added unless the text (e.g. a chat template) already carries them (EOS: at its end,
    whitespace aside).
    """
    text = "".join(piece for piece, _ in pieces)
    if tokenizer.is_fast:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        ends = list(itertools.accumulate(len(piece) for piece, _ in pieces))
        last = len(pieces) - 1
        trained = [pieces[min(bisect.bisect_right(ends, max(end - 1, start)), last)][1]
                   for start, end in encoding["offset_mapping"]]
    else:  # slow tokenizers give no offsets: tokenize piece by piece
        ids, trained = [], []
        for piece, flag in pieces:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            trained += [flag] * len(piece_ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids, trained = [bos] + ids, [False] + trained
    # ChatML ends each turn with its EOS and a newline: the turn is ended, a second EOS would be noise
    ends_with_eos = eos is not None and text.rstrip().endswith(tokenizer.eos_token)
    if eos is not None and ids[-1:] != [eos] and not ends_with_eos:
        ids, trained = ids + [eos], trained + [pieces[-1][1]]
    return ids, trained


def encode(recipe: Recipe, tokenizer, rows: list[tuple[str, dict]], fmt: str | None = None,
           part: str = "training") -> Encoded:
    """Render, check and tokenize every row before any training; a bad row stops everything here.
    `fmt`: read the rows in this format (eval rows take the training data's); `part` names them in messages."""
    spec = recipe.dataset if fmt is None else recipe.dataset.model_copy(update={"format": fmt})
    cap = recipe.training.max_seq_len
    out = Encoded(examples=[], format=spec.format)
    answerless = 0
    for fmt, pieces in render_rows(rows, spec, chat_renderer(tokenizer)):
        out.format = fmt
        ids, trained = tokenize(tokenizer, pieces)
        labels = [i if keep or not spec.completions_only else IGNORE for i, keep in zip(ids, trained, strict=True)]
        if len(ids) > cap:
            out.truncated += 1
            ids, labels = ids[:cap], labels[:cap]
        labels[0] = IGNORE  # nothing predicts a document's first token
        n_trained = sum(1 for label in labels if label != IGNORE)
        answerless += n_trained == 0
        out.trained_tokens += n_trained
        out.examples.append((ids, labels))
    out.rows = len(out.examples)
    if out.trained_tokens == 0:
        raise CloudtuneError(f"no {part} row has an answer token within max_seq_len={cap}: nothing would be "
                             f"{'trained' if part == 'training' else 'measured'}.",
                             "Raise training.max_seq_len, or shorten the prompts.")
    if out.truncated:
        out.notes.append(f"{out.truncated} of {out.rows} rows were longer than max_seq_len={cap} and were truncated")
    if answerless:
        out.notes.append(f"{answerless} rows have no answer tokens left within max_seq_len={cap}: "
                         "they cost compute and teach nothing (raise max_seq_len or shorten the prompts)")
    return out


@dataclass
class Batcher:
    """Yields the micro-batches of an epoch in a seeded order; resumable by batch index."""

    encoded: Encoded
    micro_batch_size: int
    max_seq_len: int
    packing: bool
    seed: int
    pad_id: int
    document_offsets: bool = False  # for attention.document_attention, in place of any padding mask
    width_multiple: int = 1  # rows padded to a multiple of this (row_width_multiple)

    def __post_init__(self) -> None:
        self.rows = layout([len(ids) for ids, _ in self.encoded.examples], self.max_seq_len, self.packing)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.micro_batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[dict, int]]:
        """(batch, real tokens in it) for each micro-batch of `epoch`, from batch index `start` on."""
        order = epoch_order(len(self.rows), self.seed, epoch)
        for b in range(start, len(self)):
            picked = [self.rows[i] for i in order[b * self.micro_batch_size:(b + 1) * self.micro_batch_size]]
            yield self.collate(picked)

    def collate(self, rows: list[list[int]]) -> tuple[dict, int]:
        examples = self.encoded.examples
        lengths = [sum(len(examples[i][0]) for i in row) for row in rows]
        width = -(-max(lengths) // self.width_multiple) * self.width_multiple
        # built as lists and made tensors once: a slice assignment per document cost ~3 ms a 2×4096 batch,
        # time the GPU waited between steps (bench/results/profile_step.jsonl)
        input_ids, labels, position_ids = [], [], []
        for row, length in zip(rows, lengths, strict=True):
            for i in row:
                ids, labs = examples[i]
                input_ids += ids
                labels += labs
                position_ids += range(len(ids))
            # padding restarts the positions, so it reads as one more (ignored) document
            input_ids += [self.pad_id] * (width - length)
            labels += [IGNORE] * (width - length)
            position_ids += range(width - length)
        input_ids, labels, position_ids = (torch.tensor(v, dtype=torch.long).view(len(rows), width)
                                           for v in (input_ids, labels, position_ids))
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.document_offsets:
            batch.update(document_fields(position_ids))
        elif not self.packing:
            # one document per row: a plain padding mask (the packed form needs no mask at all)
            batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch, sum(lengths)
