"""Local dataset checks before any money is spent: readable, well-formed, rows and tokens counted.

Light on purpose (stdlib; pyarrow only for parquet): `cloudtune validate` and `cloudtune cost` run it
on a laptop. The token count drives the price estimate, so it uses the model's own tokenizer when
one is available offline and says so when it has to estimate instead.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

from . import formats
from .errors import CloudtuneError
from .inputs import open_regular
from .packing import layout
from .recipe import DatasetSpec, Recipe

# Llama-family tokenizers average about 3.6 characters per token on English prose.
CHARS_PER_TOKEN_ESTIMATE = 3.6
# One JSON line or CSV field: max_seq_len (at most 131,072 tokens) never needs more than a few MiB.
MAX_LINE_BYTES = 64 * 2**20


@dataclass
class DatasetReport:
    source: str
    format: str
    rows: int
    tokens: int
    tokens_exact: bool
    truncated_rows: int
    longest_row_tokens: int
    tokenizer: str
    # Row lengths (after truncation) at percentiles 0..100: how much padding unpacked batches carry.
    length_percentiles: list[int] = field(default_factory=list)
    # Held-out rows (dataset.eval), not counted in rows and tokens above; longest_row_tokens covers them.
    eval_rows: int = 0
    eval_tokens: int = 0
    eval_source: str = ""
    # A hub dataset's size: False when it could not be read here (then rows and tokens are 0, not counted);
    # size_note says where the figures come from, or why they are unknown (cloudtune/hub.py).
    size_known: bool = True
    size_note: str = ""
    # Every row's length, in file order: planning packs and orders them as the trainer will, so the
    # tokens it prices are the ones trained. Not shown (`validate --json`) nor cached.
    row_lengths: Sequence[int] | None = field(default=None, repr=False, compare=False)
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    def rows_as_trained(self, max_seq_len: int, packing: bool) -> list[list[int]] | None:
        """The trainer's rows of documents for these settings; None when the lengths are not known here."""
        if self.row_lengths is None:
            return None
        key = (max_seq_len, packing)
        if key not in self._layouts:  # a plan asks once per offer and micro-batch size
            self._layouts[key] = layout(self.row_lengths, max_seq_len, packing)
        return self._layouts[key]


def iter_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) with `where` naming the line or item a user would look at."""
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise CloudtuneError(f"{path}: unsupported dataset file type '{suffix}'.",
                             "Use .jsonl, .json, .csv or .parquet.")
    with open_regular(path, "dataset", "Point dataset.path at the data file itself.") as handle:
        yield from readers[suffix](path, handle)


def dataset_rows(recipe: Recipe) -> Iterator[tuple[str, dict]]:
    """The local dataset's rows as training will see them: the one place dataset.max_rows applies, so
    `validate` reads exactly the rows the trainer reads, no fewer and no more."""
    file = recipe.dataset_file()
    rows = iter_rows(file) if file is not None else iter(())
    return itertools.islice(rows, recipe.dataset.max_rows)


def held_out(recipe: Recipe, rows: int) -> set[int]:
    """Indices of the rows dataset.eval.split holds out of `rows`: the same for `validate` and the trainer
    (seeded by training.seed alone, not by the data order), never trained on."""
    split = recipe.dataset.eval.split if recipe.dataset.eval else None
    if split is None:
        return set()
    count = max(1, round(split * rows)) if split < 1 else int(split)
    if count >= rows:
        raise CloudtuneError(f"dataset.eval.split {split:g} holds out {count} of the {rows} rows, leaving "
                             f"{'none' if count == rows else 'fewer than none'} to train on.",
                             "Hold out a smaller share or fewer rows, or give an eval file as dataset.eval.path.")
    return set(random.Random(f"cloudtune eval split {recipe.training.seed}").sample(range(rows), count))


def eval_file_rows(path: Path) -> list[tuple[str, dict]]:
    rows = list(iter_rows(path))
    if not rows:
        raise CloudtuneError(f"{path}: the eval file has no rows.",
                             "Add rows, or hold out a share of the training data instead (dataset.eval: 0.1).")
    return rows


def split_eval(recipe: Recipe, rows: list) -> tuple[list, list]:
    """(training rows, eval rows) of the rows the training reads, as dataset.eval says."""
    eval_file = recipe.eval_file()
    if eval_file is not None:
        return rows, eval_file_rows(eval_file)
    held = held_out(recipe, len(rows))
    return [row for i, row in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _decode(path: Path, raw: bytes, line: int = 1) -> str:
    """UTF-8, with the byte-order mark Excel and Notepad write accepted at the start of the file."""
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line += raw[: exc.start].count(b"\n")
        raise CloudtuneError(f"{path}:{line}: not UTF-8 text (byte {exc.start} of that chunk).",
                             "Re-save the dataset as UTF-8.") from None


def _jsonl_rows(path: Path, handle: BinaryIO) -> Iterator[tuple[str, dict]]:
    for number in itertools.count(1):
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise CloudtuneError(f"{path}:{number}: a line over {MAX_LINE_BYTES // 2**20} MiB, longer than any "
                                 "document max_seq_len can hold.", "Is this JSON Lines, one object per line?")
        line = _decode(path, raw, number)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            # The message never quotes the line: a dataset may hold secrets, and lines can be huge.
            raise CloudtuneError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}).",
                                 "Each line of a .jsonl file must be one JSON object.") from None
        except RecursionError:
            raise CloudtuneError(f"{path}:{number}: JSON nested too deeply to read.") from None
        if not isinstance(row, dict):
            raise CloudtuneError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
        yield f"{path}:{number}", row


def _json_rows(path: Path, handle: BinaryIO) -> Iterator[tuple[str, dict]]:
    text = _decode(path, handle.read())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CloudtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
    except RecursionError:
        raise CloudtuneError(f"{path}: JSON nested too deeply to read.") from None
    if not isinstance(data, list):
        raise CloudtuneError(f"{path}: a .json dataset must be a list of objects.",
                             "Or use .jsonl with one object per line.")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise CloudtuneError(f"{path}: item {i} is {type(row).__name__}, expected an object.")
        yield f"{path} item {i}", row


def _csv_rows(path: Path, handle: BinaryIO) -> Iterator[tuple[str, dict]]:
    # Python's default field limit (128 KiB) is below one long document; the limit is process-wide.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
    # strict: a quote that is never closed is an error, not the rest of the file read as one field
    reader = csv.DictReader(text, strict=True)
    start = 1  # where the row being read began: an unclosed quote is reported where it opened
    try:
        reader.fieldnames  # noqa: B018 - reads the header, so `start` moves past it
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise CloudtuneError(f"{path}:{reader.line_num}: more fields than the header has columns.")
            yield f"{path}:{reader.line_num}", row
            start = reader.line_num + 1
    except csv.Error as exc:
        unclosed = "end of data" in str(exc)
        raise CloudtuneError(f"{path}:{start}: not valid CSV ({exc})" +
                             ("; a quoted field opens in this row and is never closed." if unclosed else "."),
                             'Quote fields with "..." and double the quotes inside them.') from None
    except UnicodeDecodeError:
        raise CloudtuneError(f"{path}:{reader.line_num + 1}: not UTF-8 text.",
                             "Re-save the dataset as UTF-8.") from None


def _parquet_rows(path: Path, handle: BinaryIO) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise CloudtuneError("reading .parquet needs pyarrow.", "pip install pyarrow") from None
    try:
        table = pq.read_table(handle)
    except (ArrowException, OSError, ValueError) as exc:  # truncated, or another format renamed .parquet
        raise CloudtuneError(f"{path}: not a readable Parquet file ({type(exc).__name__}).",
                             "Re-export it, or use .jsonl.") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def render_rows(rows: Iterable[tuple[str, dict]], spec: DatasetSpec,
                chat: formats.ChatRenderer) -> Iterator[tuple[str, list[formats.Segment]]]:
    """Yield (format, prompt/answer pieces) per row; the first bad row raises an error naming it.

    The CLI (counting) and the trainer (tokenizing) both go through here, so a row that passes
    `cloudtune validate` is a row the trainer accepts.
    """
    fmt = spec.format
    for where, row in rows:
        try:
            if fmt == "auto":
                fmt = formats.detect_format(row, spec.columns)
            pieces = formats.segments(row, fmt, spec.columns, chat)
            formats.check_segments(pieces, fmt, spec.completions_only)
        except formats.RowError as exc:
            raise CloudtuneError(f"{where}: {exc}.",
                                 "Fix that row, or map the right columns under dataset.columns.") from None
        yield fmt, pieces


# ----------------------------------------------------------------------------------------------


Tokenize = Callable[[str], int]


def token_counter(recipe: Recipe) -> tuple[Tokenize, bool, str]:
    """Return (count_tokens(text), exact?, tokenizer description)."""
    if recipe.model.init == "tiny-llama":
        from .tiny import byte_token_count
        return byte_token_count, True, "tiny-llama bytes"
    estimate = (lambda text: int(len(text) / CHARS_PER_TOKEN_ESTIMATE) + 2), False, "estimate (≈3.6 chars/token)"
    if not _tokenizer_on_disk(recipe):  # importing transformers only to fail offline costs seconds
        return estimate
    try:
        from transformers import AutoTokenizer  # heavy: only when counting exactly is possible
        tokenizer = AutoTokenizer.from_pretrained(recipe.model.name, revision=recipe.model.revision,
                                                  local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer offline is normal; we estimate instead
        return estimate
    return (lambda text: len(tokenizer(text)["input_ids"]) + 1), True, recipe.model.name


def _tokenizer_on_disk(recipe: Recipe) -> bool:
    from .planning.models import hf_cache_snapshot

    name = recipe.model.name or ""
    local = Path(name).expanduser()
    if local.is_dir():
        return True
    return hf_cache_snapshot(name, recipe.model.revision, "tokenizer_config.json") is not None


def inspect_dataset(recipe: Recipe, progress: Callable[[int], None] | None = None) -> DatasetReport:
    """Read every row, check it against the format, count tokens. Raise CloudtuneError on bad data."""
    file = recipe.dataset_file()
    if file is None:
        from .hub import hub_report

        return hub_report(recipe)
    count, exact, tokenizer_name = token_counter(recipe)
    fmt, lengths = _token_lengths(dataset_rows(recipe), recipe.dataset, count, progress)
    if not lengths:
        raise CloudtuneError(f"{file}: the dataset has no rows.", "Add training examples to the file.")
    trained, held, eval_source = _eval_lengths(recipe, fmt, lengths, count)
    cap = recipe.training.max_seq_len
    capped = [min(n, cap) for n in trained]
    return DatasetReport(source=str(file), format=fmt, rows=len(trained), tokens=sum(capped), tokens_exact=exact,
                         truncated_rows=sum(n > cap for n in trained), longest_row_tokens=max(trained + held),
                         tokenizer=tokenizer_name, length_percentiles=percentiles(capped), eval_rows=len(held),
                         eval_tokens=sum(min(n, cap) for n in held), eval_source=eval_source, row_lengths=capped)


def _token_lengths(rows: Iterable[tuple[str, dict]], spec: DatasetSpec, count: Tokenize,
                   progress: Callable[[int], None] | None = None) -> tuple[str, list[int]]:
    """(format, tokens of each row before truncation)."""
    fmt = spec.format
    lengths = array("I")
    for detected, pieces in render_rows(rows, spec, counting_chat(spec)):
        fmt = detected
        lengths.append(count("".join(text for text, _trained in pieces)))
        if progress is not None:
            progress(len(lengths))
    return fmt, list(lengths)


def counting_chat(spec: DatasetSpec) -> formats.ChatRenderer:
    """How this side renders chats without the model's tokenizer: dataset.chat_template when the recipe sets one
    (so a conversation its template refuses is refused by `validate`), else the fallback template."""
    if spec.chat_template is None:
        return formats.fallback_chat
    from .chat_templates import render, resolve

    template = resolve(spec.chat_template)
    # the special tokens' text is the tokenizer's: each counts as one token or so, left out of the estimate
    return lambda messages, generation: render(template, messages, generation, bos_token="", eos_token="")


def _eval_lengths(recipe: Recipe, fmt: str, lengths: list[int], count: Tokenize) -> tuple[list[int], list[int], str]:
    """(training rows' lengths, eval rows' lengths, where the eval rows come from)."""
    eval_file = recipe.eval_file()
    if eval_file is not None:  # read in the training data's format, as the trainer reads it
        _, held = _token_lengths(eval_file_rows(eval_file), recipe.dataset.model_copy(update={"format": fmt}), count)
        return lengths, held, str(eval_file)
    indices = held_out(recipe, len(lengths))
    if not indices:
        return lengths, [], ""
    split = recipe.dataset.eval.split
    share = f"{split:.0%}" if split < 1 else f"{int(split)} rows"
    return ([n for i, n in enumerate(lengths) if i not in indices], [lengths[i] for i in sorted(indices)],
            f"{share} of the data, held out with seed {recipe.training.seed}")


def percentiles(values) -> list[int]:
    ordered = sorted(values)
    return [ordered[round(p / 100 * (len(ordered) - 1))] for p in range(101)] if ordered else []
