"""Secrets: collected from the environment by name, forwarded to training, redacted everywhere else.

Values never go into the ledger, a task file, an error message or a log line: every text stream
that leaves the training process passes through `Redactor` first.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CloudtuneError

REDACTED = "<redacted>"
# Short values would redact ordinary words; real tokens are far longer.
MIN_REDACT_LENGTH = 6


def _hf_token_file() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "token"


def collect(names: list[str]) -> dict[str, str]:
    """The values of the named environment variables; HF_TOKEN may also come from `hf auth login`."""
    values: dict[str, str] = {}
    missing = []
    for name in names:
        value = os.environ.get(name)
        if not value and name == "HF_TOKEN" and _hf_token_file().is_file():
            value = _hf_token_file().read_text().strip()
        if value:
            values[name] = value
        else:
            missing.append(name)
    if missing:
        raise CloudtuneError(f"secrets named in the recipe are not set: {', '.join(missing)}.",
                             f"Export them first (e.g. `export {missing[0]}=...`) or remove them from `secrets:`.")
    return values


class Redactor:
    def __init__(self, values: dict[str, str] | list[str]):
        found = values.values() if isinstance(values, dict) else values
        # Longest first, so a secret that contains another is replaced whole.
        self._values = sorted({v for v in found if len(v) >= MIN_REDACT_LENGTH}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text
