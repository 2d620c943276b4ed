"""Small JSON state files (the offers cache, the catalog seed record), replaced atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: Path):
    """The file's data, or None when it is missing or unreadable: a broken cache is a cache miss."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data) -> None:
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data))
    os.replace(scratch, path)  # a concurrent reader sees the old file or the new one, never half of one
