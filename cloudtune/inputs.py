"""Files and names a user hands us, checked before anything reads or writes them.

A FIFO blocks the first read forever and a character device never ends, so a file's type is
checked before it is read; names that the file system or the terminal cannot take are refused
with the reason instead of surfacing later as OSError, RuntimeError or UnicodeEncodeError.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from .errors import CloudtuneError, printable

MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX of ext4, xfs, btrfs, tmpfs
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SURROGATE = re.compile(r"[\ud800-\udfff]")

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_OS_REASONS = {errno.ENOENT: "no such file", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ELOOP: "a loop of symbolic links", errno.ENAMETOOLONG: "the name is too long",
               errno.ENOTDIR: "a part of the path is not a directory", errno.EISDIR: "a directory",
               errno.EROFS: "a read-only file system"}


def text_problem(text: str) -> str | None:
    """Why `text` cannot be a recipe value: control characters (NUL, terminal escapes) or lone
    surrogates (not Unicode; no terminal or file system encoding takes them). None when it is fine."""
    found = _CONTROL.search(text)
    if found:
        char = found.group()
        what = "a NUL character" if char == "\x00" else f"the control character U+{ord(char):04X}"
        return f"contains {what} at character {found.start() + 1}"
    found = SURROGATE.search(text)
    if found:
        return f"contains a lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1} (not Unicode)"
    return None


def path_problem(text: str) -> str | None:
    """Why `text` cannot name a file here, or None."""
    problem = text_problem(text)
    if problem:
        return problem
    raw = os.fsencode(text)
    if len(raw) > MAX_PATH_BYTES:
        return f"is {len(raw):,} bytes long; paths are at most {MAX_PATH_BYTES}"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > MAX_NAME_BYTES:
        return f"has a name of {len(longest)} bytes; file systems allow {MAX_NAME_BYTES}"
    if text.startswith("~") and os.path.expanduser(text).startswith("~"):
        user = text[1:].split("/", 1)[0]
        return f"starts with ~{user}, and there is no user '{user}' whose home it could be"
    return None


def os_reason(exc: OSError) -> str:
    return _OS_REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


def _kind(mode: int) -> str | None:
    return next((name for test, name in _KINDS if test(mode)), None)


def regular_file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file that can be read, or None."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return os_reason(exc)
    except ValueError as exc:  # embedded NUL, unencodable name
        return str(exc)
    kind = _kind(info.st_mode)
    return f"is {kind}, not a file" if kind else None


def open_regular(path: Path, what: str, hint: str | None = None) -> BinaryIO:
    """Open `path` for reading, refusing anything but a regular file before a single byte is read.

    Opened non-blocking so a FIFO swapped in after the check cannot block the open either; the type
    is checked again on the open descriptor."""
    problem = regular_file_problem(path)
    if problem:
        raise CloudtuneError(f"{path}: the {what} {problem}.", hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CloudtuneError(f"{path}: the {what} cannot be opened ({os_reason(exc)}).", hint) from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise CloudtuneError(f"{path}: the {what} is {kind}, not a file.", hint)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def writable_dir_problem(path: Path) -> str | None:
    """Why outputs could not be written to directory `path` (which may not exist yet), or None.

    Tried for real with a scratch directory: permission bits do not tell root, read-only mounts or
    full quotas apart."""
    nearest = path
    while not os.path.lexists(nearest) and nearest.parent != nearest:
        nearest = nearest.parent
    try:
        is_dir = stat.S_ISDIR(os.stat(nearest).st_mode)
    except OSError as exc:
        return f"cannot be used: {nearest}: {os_reason(exc)}"
    if not is_dir:
        return "is a file" if nearest == path else f"would be inside {nearest}, which is not a directory"
    try:
        tempfile.TemporaryDirectory(dir=nearest, prefix=".cloudtune-write-check-").cleanup()
    except OSError as exc:
        return f"cannot be written: {nearest} refuses new files ({os_reason(exc)})"
    return None


MAX_CONFIG_BYTES = 16 * 2**20
# The sizes the cost model multiplies and loops over (one pass per layer per offer), with bounds past
# any published dense model: a config outside them is damaged or hostile, and prices nonsense or never ends.
CONFIG_SIZES = {"hidden_size": 2**20, "intermediate_size": 2**22, "num_hidden_layers": 512,
                "num_attention_heads": 2**14, "vocab_size": 2**24}
OPTIONAL_SIZES = {"num_key_value_heads": 2**14, "head_dim": 2**16}


def model_config_problem(path: Path) -> str | None:
    """Why a model directory's config.json cannot give the model's shape, or None."""
    try:
        with open_regular(path, "model config") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except CloudtuneError as exc:
        return exc.message
    if len(raw) > MAX_CONFIG_BYTES:
        return f"{path}: over {MAX_CONFIG_BYTES // 2**20} MiB, too big for a model config"
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 errors
        return f"{path}: not valid JSON ({type(exc).__name__})"
    for _level in range(4):  # multimodal checkpoints keep the language model a level or two down
        if not (isinstance(config, dict) and isinstance(config.get("text_config"), dict)):
            break
        config = config["text_config"]
    if not isinstance(config, dict):
        return f"{path}: a model config is a JSON object, but this file holds {type(config).__name__}"
    for key, limit in {**CONFIG_SIZES, **OPTIONAL_SIZES}.items():
        value = config.get(key)
        if value is None and key in OPTIONAL_SIZES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            return (f"{path}: {key} should be a whole number from 1 to {limit:,}, "
                    f"got {printable(repr(value), 40)}")
    return None
