"""Backends by name: the class (imported only when chosen), its typed options, and the `run` flags they add.

Adding a place to train means one entry here (or a `register` call from elsewhere, as the tests
do) and a module of its own; nothing in the CLI or the lifecycle names a backend.
"""
from __future__ import annotations

import difflib
import importlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import CloudtuneError

if TYPE_CHECKING:  # the base pulls in pydantic, yaml and the recipe: `--help`, `gpus` and `cost` need none of it here
    from pydantic import ValidationError

    from ..events import Events
    from .base import Backend, BackendOptions

DEFAULT_BACKEND = "skypilot"


@dataclass(frozen=True)
class BackendEntry:
    name: str
    summary: str  # for `run --help`: what the backend trains on
    backend_class: str  # "package.module:Class", imported when the backend is chosen
    options_class: str = "cloudtune.backends.base:BackendOptions"  # light: the CLI reads it for --help
    # "package.module:function(state) -> bool": cleans what a run whose CLI died left on a machine, when
    # that is cheap to do at every CLI start (no network); None where the backend has no such cleaning
    dead_run_sweeper: str | None = None

    def load(self) -> type[Backend]:
        return _resolve(self.backend_class)

    def options(self) -> type[BackendOptions]:
        return _resolve(self.options_class)

    def sweeper(self):
        return _resolve(self.dead_run_sweeper) if self.dead_run_sweeper else None


def _resolve(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


_ENTRIES: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> None:
    _ENTRIES[entry.name] = entry


def unregister(name: str) -> None:
    _ENTRIES.pop(name, None)


def entries() -> list[BackendEntry]:
    return list(_ENTRIES.values())


def entry(name: str) -> BackendEntry:
    if name not in _ENTRIES:
        guess = difflib.get_close_matches(name, list(_ENTRIES), n=1, cutoff=0.5)
        raise CloudtuneError(f"unknown backend '{name}'.", (f"Did you mean {guess[0]}? " if guess else "")
                             + f"Choose one of: {', '.join(_ENTRIES)}.")
    return _ENTRIES[name]


def create(name: str, flags: dict | None = None, events: Events | None = None, *, launching: bool = False,
           **extra) -> Backend:
    """A backend ready to act: its options checked against what the command line gave.

    `flags` holds every backend's flags as click parsed them (unset ones None/False); a flag of
    another backend that was set is a mistake worth saying, not silently ignoring.
    """
    from pydantic import ValidationError

    chosen = entry(name)
    options_model = chosen.options()
    flags = flags or {}
    _refuse_foreign_flags(name, options_model, flags)
    given = {key: value for key, value in flags.items() if key in options_model.model_fields and value is not None}
    try:
        options = options_model(**given)
    except ValidationError as exc:
        raise _options_error(name, options_model, exc) from None
    if launching:
        options.check_for_launch()
    return chosen.load()(options, events, **extra)


def _refuse_foreign_flags(name: str, options_model: type[BackendOptions], flags: dict) -> None:
    for key, value in flags.items():
        if key in options_model.model_fields or value in (None, False):
            continue
        owner = next((e.name for e in entries() if key in e.options().model_fields), "another backend")
        raise CloudtuneError(f"{flag_name(key)} only applies to --backend {owner}.",
                             f"Add --backend {owner}, or drop {flag_name(key)}.")


def _options_error(name: str, options_model: type[BackendOptions], exc: ValidationError) -> CloudtuneError:
    problem = exc.errors()[0]
    key = str(problem["loc"][0]) if problem["loc"] else ""
    field = options_model.model_fields.get(key)
    if problem["type"] == "missing":
        what = f"--backend {name} needs {flag_name(key)}"
    else:
        what = f"{flag_name(key)}: {problem['msg']}"
    return CloudtuneError(f"{what}.", field.description if field else None)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def click_options() -> list[click.Option]:
    """Every registered backend's options as `run` flags, each help text saying which backend it is for."""
    options: dict[str, click.Option] = {}
    for backend in entries():
        for key, field in backend.options().model_fields.items():
            if key not in options:
                options[key] = _click_option(backend.name, key, field)
    return list(options.values())


def _click_option(backend: str, key: str, field) -> click.Option:
    help_text = f"{backend}: {field.description or key}"
    kind = _plain_type(field.annotation)
    if kind is bool:
        return click.Option([flag_name(key), key], is_flag=True, default=False, help=help_text)
    click_type: click.ParamType | type = click.Path(path_type=Path) if kind is Path else str
    return click.Option([flag_name(key), key], type=click_type, default=None, help=help_text)


def _plain_type(annotation) -> type:
    """`Path | None` -> Path: the type a flag parses into."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


class BackendFlagsCommand(click.Command):
    """A command whose flags include every registered backend's, read when the command line is parsed,
    so a backend registered after import (a plugin, a test) gets its flags too."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        own = super().get_params(ctx)
        help_option = [param for param in own if param.name == "help"]
        rest = [param for param in own if param.name != "help"]
        return rest + click_options() + help_option


def backend_help() -> str:
    return "Where to train: " + "; ".join(f"{e.name} ({e.summary})" for e in entries()) + "."


register(BackendEntry("skypilot", "the cheapest cloud GPU that fits", "cloudtune.backends.skypilot:SkyPilotBackend",
                      dead_run_sweeper="cloudtune.backends.skypilot:sweep_dead"))
register(BackendEntry("ssh", "a machine you can SSH into, --host", "cloudtune.backends.ssh.backend:SSHBackend",
                      "cloudtune.backends.ssh.options:SSHOptions"))
register(BackendEntry("local", "this machine: demo, tests", "cloudtune.backends.local:LocalBackend",
                      dead_run_sweeper="cloudtune.backends.local:sweep_dead"))

