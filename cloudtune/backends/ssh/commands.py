"""The programs the SSH backend runs on the machine, as command lines, and how their answers are read.

The programs are files: `scripts/*.sh` and `scripts/*.py` beside this module, and the shared helpers
of `cloudtune.remote` (which the machine may not have installed yet). Each is loaded with
importlib.resources and sent whole on the command line (`sh -c TEXT sh ARGS`, `python -c TEXT ARGS`), so
nothing needs copying first and every run uses the code of the cloudtune that started it. Programs
answer on lines that start with MARK, so a chatty login shell cannot confuse what is parsed.
"""
from __future__ import annotations

import shlex
from functools import cache
from importlib import resources

from ... import remote

MARK = "CLOUDTUNE:"


@cache
def source(name: str) -> str:
    """The text of scripts/NAME (e.g. "probe.sh"), or of a cloudtune.remote helper ("remote:stop_group")."""
    if name.startswith("remote:"):
        return remote.source(name.removeprefix("remote:"))
    return resources.files(__package__).joinpath("scripts").joinpath(name).read_text()


def sh(name: str, *args: object) -> str:
    """A command line that runs scripts/NAME with POSIX sh, whatever the login shell is."""
    return shlex.join(["/bin/sh", "-c", source(name), "sh", *map(str, args)])


def python(interpreter: str, name: str, *args: object, inside: list[str] | None = None) -> str:
    """A command line that runs a Python program (a scripts/ file or a cloudtune.remote helper) with
    interpreter, optionally inside another command (`docker run ... IMAGE`)."""
    return shlex.join([*(inside or []), interpreter, "-c", source(name), *map(str, args)])


def with_env(env: dict[str, str], command: str) -> str:
    """command with these variables in its environment (never a secret: `ps` shows them)."""
    return shlex.join(["env", *(f"{key}={value}" for key, value in env.items())]) + " " + command


def marks(output: str) -> list[str]:
    """What the programs said on their MARK lines, in order."""
    return [line[len(MARK):] for line in output.splitlines() if line.startswith(MARK)]


def marked(output: str) -> str | None:
    """The last MARK line's answer, or None when there is none."""
    found = marks(output)
    return found[-1] if found else None
