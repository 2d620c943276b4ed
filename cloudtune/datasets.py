"""Local dataset checks before any money is spent: readable, well-formed, rows and tokens counted.

Light on purpose (stdlib; pyarrow only for parquet): `cloudtune validate` and `cloudtune cost` run it
on a laptop. The token count drives the price estimate, so it uses the model's own tokenizer when
one is available offline and says so when it has to estimate instead.
"""
from __future__ import annotations

import csv
import io
import json
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import formats
from .errors import CloudtuneError
from .recipe import DatasetSpec, Recipe

# Llama-family tokenizers average about 3.6 characters per token on English prose.
CHARS_PER_TOKEN_ESTIMATE = 3.6


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def iter_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) with `where` naming the line or item a user would look at."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise CloudtuneError(f"{path}: unsupported dataset file type '{suffix}'.",
                             "Use .jsonl, .json, .csv or .parquet.")


def _decode(path: Path, raw: bytes, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1 + offset
        raise CloudtuneError(f"{path}:{line}: not UTF-8 text (byte {exc.start} of that chunk).",
                             "Re-save the dataset as UTF-8.") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(path, raw, number - 1)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CloudtuneError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}).",
                                     "Each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(row, dict):
                raise CloudtuneError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            yield f"{path}:{number}", row


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CloudtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    if not isinstance(data, list):
        raise CloudtuneError(f"{path}: a .json dataset must be a list of objects.",
                             "Or use .jsonl with one object per line.")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise CloudtuneError(f"{path}: item {i} is {type(row).__name__}, expected an object.")
        yield f"{path} item {i}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    text = _decode(path, path.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        if None in row:
            raise CloudtuneError(f"{path}:{reader.line_num}: more fields than the header has columns.")
        yield f"{path}:{reader.line_num}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CloudtuneError("reading .parquet needs pyarrow.", "pip install pyarrow") from None
    table = pq.read_table(path)
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
        return DatasetReport(source=f"hub:{recipe.dataset.hub}", format=recipe.dataset.format, rows=0, tokens=0,
                             tokens_exact=False, truncated_rows=0, longest_row_tokens=0,
                             tokenizer="checked on the training machine")
    count, exact, tokenizer_name = token_counter(recipe)
    fmt = recipe.dataset.format
    rows = tokens = truncated = longest = 0
    lengths = array("I")
    cap = recipe.training.max_seq_len
    for detected, pieces in render_rows(iter_rows(file), recipe.dataset, formats.fallback_chat):
        fmt = detected
        n = count("".join(text for text, _trained in pieces))
        longest = max(longest, n)
        if n > cap:
            truncated += 1
            n = cap
        tokens += n
        lengths.append(n)
        rows += 1
        if progress is not None:
            progress(rows)
        if recipe.dataset.max_rows and rows >= recipe.dataset.max_rows:
            break
    if rows == 0:
        raise CloudtuneError(f"{file}: the dataset has no rows.", "Add training examples to the file.")
    return DatasetReport(source=str(file), format=fmt, rows=rows, tokens=tokens, tokens_exact=exact,
                         truncated_rows=truncated, longest_row_tokens=longest, tokenizer=tokenizer_name,
                         length_percentiles=percentiles(lengths))


def percentiles(values) -> list[int]:
    ordered = sorted(values)
    return [ordered[round(p / 100 * (len(ordered) - 1))] for p in range(101)] if ordered else []
