"""Moving files to and from the machine over SFTP: resumable, checksummed, retried after a drop.

An upload goes to `<target>.part` and resumes from that file's size after an interruption (this
process's or an earlier run's); only a file whose sha256 matches is renamed into place. Downloads walk
the remote folder and fetch file by file, each retried from the start when the connection drops.
"""
from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

from ...errors import CloudtuneError
from . import commands
from .transport import Connection

UPLOAD_CHUNK = 256 * 1024
READ_LIMIT = 1 << 20

Progress = Callable[[str, int, int], None]


def remote_sha256(conn: Connection, path: str) -> str | None:
    """The sha256 of a file on the machine, or None when there is no such file."""
    _, output = conn.run(commands.sh("sha256.sh", commands.MARK, path), check=False)
    found = commands.marked(output)
    return found.split()[0] if found else None


def send(conn: Connection, local: Path, remote: str, progress: Progress,
         phase: Callable[[str, str], None]) -> None:
    """Copy local to remote, continuing after the bytes a previous attempt left there."""
    sftp = conn.files()
    size = local.stat().st_size
    try:
        offset = sftp.stat(remote).st_size
    except FileNotFoundError:
        offset = 0
    if offset > size:
        offset = 0
    if offset:
        phase("upload", f"resuming at {offset:,} of {size:,} bytes")
    with local.open("rb") as source, sftp.open(remote, "r+b" if offset else "wb") as sink:
        sink.set_pipelined(True)
        source.seek(offset)
        sink.seek(offset)
        done = offset
        progress("upload", done, size)
        while chunk := source.read(UPLOAD_CHUNK):
            sink.write(chunk)
            done += len(chunk)
            progress("upload", done, size)


def upload_verified(conn: Connection, local: Path, sha256: str, target: str, *, progress: Progress,
                    phase: Callable[[str, str], None], warn: Callable[[str], None]) -> None:
    """Put local at target unless the machine has it already; resumes, and starts over once on a bad sha256."""
    if remote_sha256(conn, target) == sha256:
        phase("upload", "skipped: the machine already has this bundle (sha256 matches)")
        return
    partial = target + ".part"
    digest = None
    for fresh in (False, True):
        if fresh:  # the resumed file did not check out: start over once
            warn("the uploaded bundle did not match its sha256; uploading it again from the start")
            conn.files().remove(partial)
        conn.retrying("uploading the bundle", lambda: send(conn, local, partial, progress, phase))
        digest = remote_sha256(conn, partial)
        if digest == sha256:
            conn.files().posix_rename(partial, target)
            return
    conn.files().remove(partial)
    raise CloudtuneError(f"the bundle uploaded to {conn.where} has sha256 {digest}, not {sha256}, even after a "
                         "fresh upload.", "Check the machine's disk (full? failing?) and run again.")


def walk(conn: Connection, folder: str, skip: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """(path, size) of every regular file under a remote folder; `skip` names top-level entries to leave out."""
    found = []
    for entry in conn.files().listdir_attr(folder):
        if entry.filename in skip:
            continue
        path = f"{folder}/{entry.filename}"
        if stat.S_ISDIR(entry.st_mode):
            found += walk(conn, path)
        elif stat.S_ISREG(entry.st_mode):
            found.append((path, entry.st_size))
    return found


def download_tree(conn: Connection, folder: str, dest: Path, progress: Progress, skip: tuple[str, ...] = ()) -> None:
    """Copy a remote folder into dest, reporting ("download", bytes so far, total)."""
    files = conn.retrying("listing the outputs", lambda: walk(conn, folder, skip))
    total = sum(size for _, size in files)
    done = 0
    for remote, size in files:
        local = dest / remote[len(folder) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)

        def fetch(remote=remote, local=local, base=done):
            conn.files().get(remote, str(local), callback=lambda got, _size: progress("download", base + got, total))

        conn.retrying(f"downloading {remote}", fetch)
        done += size


def write_private(conn: Connection, path: str, text: str) -> None:
    """A file only the login user can read: made 0600 before a single byte is written."""
    with conn.files().open(path, "w") as handle:
        handle.chmod(0o600)
        handle.write(text)


def read_text(conn: Connection, path: str) -> str:
    with conn.files().open(path, "r") as handle:
        return handle.read().decode(errors="replace")


def read_from(conn: Connection, path: str, offset: int, folder: str) -> bytes:
    """Bytes of a remote file from offset on (at most 1 MiB); nothing if it does not exist yet.
    Raises FileNotFoundError when folder, where the file is to appear, is gone."""
    try:
        with conn.files().open(path, "r") as handle:
            handle.seek(offset)
            return handle.read(READ_LIMIT)
    except FileNotFoundError:
        conn.files().stat(folder)
        return b""


def exists(conn: Connection, path: str) -> bool:
    try:
        conn.files().stat(path)
        return True
    except FileNotFoundError:
        return False
