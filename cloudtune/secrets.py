"""Secrets: collected from the environment by name, forwarded to training, redacted everywhere else.

Values never go into the ledger, a task file, an error message or a log line: every text stream
that leaves the training process passes through `Redactor` first, and the trainer redacts its own
output, so every stored log is clean wherever it is read.

The values of this process's secrets are kept in one registry (`collect` and `watch` fill it); `redact`
uses it, so error messages and ledger text are cleaned by the same rule without passing values around.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, quote_plus

from .errors import CloudtuneError

REDACTED = "<redacted>"
# A value is redacted wherever it appears; a short or common one would also blank ordinary words and
# numbers in every log and message (and be guessed from where the blanks are), so it is refused instead.
MIN_SECRET_LENGTH = 8
MAX_NUMBER_DIGITS = 12  # all-digit values shorter than this look like step counts, sizes, dates
COMMON_VALUES = frozenset({
    "password", "passw0rd", "password1", "changeme", "changeit", "secret", "secret123", "letmein", "welcome",
    "admin123", "qwertyui", "iloveyou", "sunshine", "football", "baseball", "trustno1", "superman", "abcdefgh",
    "default", "example", "undefined", "null", "none", "true", "false", "test1234", "testtest", "localhost",
})

_active: set[str] = set()
_cached: dict[frozenset[str], Redactor] = {}  # one compiled Redactor for the registry as it is now


def _hf_token_file() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "token"


def _value_of(name: str) -> str | None:
    value = os.environ.get(name)
    if not value and name == "HF_TOKEN" and _hf_token_file().is_file():
        value = _hf_token_file().read_text().strip()
    return value or None


def unsafe_reason(value: str) -> str | None:
    """Why a value cannot be redacted safely, or None when it can."""
    if len(value) < MIN_SECRET_LENGTH:
        return f"it is shorter than {MIN_SECRET_LENGTH} characters"
    if value.isdigit() and len(value) < MAX_NUMBER_DIGITS:
        return f"it is a number of fewer than {MAX_NUMBER_DIGITS} digits"
    if value.lower() in COMMON_VALUES or len(set(value)) == 1:
        return "it is a common word"
    return None


def collect(names: list[str]) -> dict[str, str]:
    """The values of the named environment variables; HF_TOKEN may also come from `hf auth login`.

    A value that cannot be redacted safely is refused, naming the variable and never its value.
    """
    values = {name: value for name in names if (value := _value_of(name))}
    missing = [name for name in names if name not in values]
    if missing:
        raise CloudtuneError(f"secrets named in the recipe are not set: {', '.join(missing)}.",
                             f"Export them first (e.g. `export {missing[0]}=...`) or remove them from `secrets:`.")
    for name, value in values.items():
        reason = unsafe_reason(value)
        if reason:
            raise CloudtuneError(f"the secret {name} cannot be kept out of logs safely: {reason}, so hiding it "
                                 "would also hide ordinary text.",
                                 f"Use a longer, random value for {name} (a real token), or remove it from "
                                 "`secrets:`.")
    _active.update(values.values())
    return values


def watch(names: Iterable[str]) -> None:
    """Redact the values these variables have here from every message, without requiring or checking them
    (`validate` and `cost` only read a recipe; `run` checks the values through `collect`)."""
    _active.update(value for name in names if (value := _value_of(name)) and not unsafe_reason(value))


def forget_all() -> None:
    """Empty the registry (tests, and a long-lived process that moves on to another run)."""
    _active.clear()
    _cached.clear()


def redact(text: str) -> str:
    """`text` with every form of every registered secret replaced."""
    if not _active:
        return text
    key = frozenset(_active)
    if key not in _cached:
        _cached.clear()
        _cached[key] = Redactor(key)
    return _cached[key](text)


def forms(value: str) -> set[str]:
    """Every way a value is commonly written into text: raw, repr, JSON, shell-quoted, URL-encoded."""
    json_ascii, json_utf8 = json.dumps(value), json.dumps(value, ensure_ascii=False)
    found = {value, repr(value), repr(value)[1:-1], json_ascii, json_ascii[1:-1], json_utf8, json_utf8[1:-1],
             shlex.quote(value), value.replace("'", "'\\''"), quote(value, safe=""), quote(value), quote_plus(value)}
    return {form for form in found if form}


class Redactor:
    def __init__(self, values: dict[str, str] | Iterable[str]):
        found = values.values() if isinstance(values, dict) else values
        # Longest first, so a form that contains another (a quoted value, a secret holding another) goes whole.
        every = sorted({form for value in found if value for form in forms(value)}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, every))) if every else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern else text
