"""How big a hub dataset is, before anything downloads it: what `validate`, `cost` and `run` price.

The training machine downloads and counts a hub dataset; here only its size can be known: from the
table of the datasets the shipped recipes train on, else from the hub itself (the dataset card's
`dataset_info`, which `huggingface_hub.HfApi.dataset_info` returns as `card_data`, else the
datasets-server's size API). Plain HTTP through urllib: the laptop install has no huggingface_hub.
Offline, or when the hub does not say, the size is UNKNOWN, and callers say so rather than price 0 tokens.
"""
from __future__ import annotations

import json
import math
import os
import random
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .datasets import CHARS_PER_TOKEN_ESTIMATE, DatasetReport, percentiles
from .recipe import Recipe

# The shipped recipes' datasets, known without network: their published number of training rows.
HUB_DATASET_ROWS = {"mlabonne/guanaco-llama2-1k": 1000, "timdettmers/openassistant-guanaco": 9846}
HUB_TIMEOUT_S = 5.0
DATASETS_SERVER = "https://datasets-server.huggingface.co"
DATASETS_SERVER_ENV = "CLOUDTUNE_DATASETS_SERVER"  # a mirror's datasets-server (tests: one on 127.0.0.1)
# Without a byte count: guanaco's row lengths (lognormal, median 350 tokens, sigma 0.8), the
# distribution the benchmarks in bench/common.py use.
MEDIAN_ROW_TOKENS, LENGTH_SIGMA = 350, 0.8


@dataclass(frozen=True)
class HubSize:
    rows: int
    bytes: int | None  # the split's data size as the hub states it, when it does
    source: str  # where the figure comes from, for the note a plan prints


class SizeUnknown(Exception):
    """Why the hub dataset's size could not be read here (offline, not found, not stated)."""


def hub_report(recipe: Recipe) -> DatasetReport:
    """The report of a hub dataset: its size as published, or a report whose size is UNKNOWN."""
    spec = recipe.dataset
    try:
        size = dataset_size(spec.hub or "", spec.subset, spec.split, bool(spec.data_files))
    except SizeUnknown as why:
        priced = ("training.max_steps prices the training, with assumed row lengths" if recipe.training.max_steps
                  else "the training itself is NOT priced; set training.max_steps to price it")
        return DatasetReport(source=f"hub:{spec.hub}", format=spec.format, rows=0, tokens=0, tokens_exact=False,
                             truncated_rows=0, longest_row_tokens=0, tokenizer="counted on the training machine",
                             size_known=False, size_note=f"hub dataset {spec.hub}: size UNKNOWN ({why}); {priced}")
    rows = min(size.rows, spec.max_rows or size.rows)
    cap = recipe.training.max_seq_len
    mean = size.bytes / size.rows / CHARS_PER_TOKEN_ESTIMATE if size.bytes else None
    # lognormal lengths whose mean is the stated bytes per row (the mean of a lognormal is median·e^(σ²/2))
    median = mean / math.exp(LENGTH_SIGMA ** 2 / 2) if mean else MEDIAN_ROW_TOKENS
    rng = random.Random(0)
    raw = [max(16, int(rng.lognormvariate(math.log(max(median, 1.0)), LENGTH_SIGMA))) for _ in range(rows)]
    lengths = [min(cap, n) for n in raw]
    shape = "lengths from its stated bytes per row" if mean else "lengths assumed guanaco-like"
    return DatasetReport(source=f"hub:{spec.hub}", format=spec.format, rows=rows, tokens=sum(lengths),
                         tokens_exact=False, truncated_rows=sum(n > cap for n in raw),
                         longest_row_tokens=max(raw, default=0), tokenizer=f"estimate (rows {size.source})",
                         length_percentiles=percentiles(lengths),
                         size_note=f"hub dataset {spec.hub}: {size.rows:,} rows {size.source}, {shape}; the "
                                   "training machine counts the real tokens")


def dataset_size(repo: str, subset: str | None, split: str, own_files: bool) -> HubSize:
    if repo in HUB_DATASET_ROWS and not subset and split == "train" and not own_files:
        return HubSize(HUB_DATASET_ROWS[repo], None, "as published")
    if own_files:
        raise SizeUnknown("dataset.data_files picks files the hub states no size for")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SizeUnknown("HF_HUB_OFFLINE is set, so the hub was not asked")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    quoted = urllib.parse.quote(repo, safe="/")
    card = _get(f"{endpoint}/api/datasets/{quoted}")
    found = _from_card((card or {}).get("cardData") or {}, subset, split)
    if found is not None:
        return found
    server = (os.environ.get(DATASETS_SERVER_ENV) or DATASETS_SERVER).rstrip("/")
    sizes = _get(f"{server}/size?{urllib.parse.urlencode({'dataset': repo})}")
    found = _from_size_api((sizes or {}).get("size") or {}, subset, split)
    if found is not None:
        return found
    raise SizeUnknown("the hub states no row count for split " + (f"{subset}/" if subset else "") + split)


def _get(url: str) -> dict | None:
    """The JSON at url; None when the hub answers without it (404, not JSON); SizeUnknown without a hub."""
    request = urllib.request.Request(url, headers={"User-Agent": "cloudtune"})
    token = os.environ.get("HF_TOKEN")
    if token:  # a private dataset's card is visible only with the token its training would use
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            return json.loads(response.read(8 << 20))
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SizeUnknown(f"the hub at {urllib.parse.urlsplit(url).netloc} cannot be reached: {reason}") from None
    except ValueError:
        return None


def _from_card(card: dict, subset: str | None, split: str) -> HubSize | None:
    infos = card.get("dataset_info")
    infos = infos if isinstance(infos, list) else [infos] if isinstance(infos, dict) else []
    wanted = subset or "default"
    info = next((i for i in infos if isinstance(i, dict) and i.get("config_name", "default") == wanted), None)
    if info is None and not subset and len(infos) == 1 and isinstance(infos[0], dict):
        info = infos[0]
    for entry in (info or {}).get("splits") or []:
        if isinstance(entry, dict) and entry.get("name") == split and _count(entry.get("num_examples")):
            return HubSize(int(entry["num_examples"]), _count(entry.get("num_bytes")), "from the hub's dataset card")
    return None


def _from_size_api(size: dict, subset: str | None, split: str) -> HubSize | None:
    for entry in size.get("splits") or []:
        if not isinstance(entry, dict) or entry.get("split") != split:
            continue
        if subset and entry.get("config") != subset:
            continue
        if _count(entry.get("num_rows")):
            return HubSize(int(entry["num_rows"]), _count(entry.get("num_bytes_memory")),
                           "from the hub's datasets-server")
    return None


def _count(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
