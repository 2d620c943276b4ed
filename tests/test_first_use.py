"""First use that feels finished (issue 16): a spinner saying what takes seconds, hub datasets priced only
where their size is known, a training log that is ours, `cloudtune clean`, completion."""
from __future__ import annotations

import io
import time

from click.testing import CliRunner
from rich.console import Console

from cloudtune.cli import cli
from cloudtune.events import Events
from cloudtune.render import RichEvents, spinner


def invoke(*args: str, **kwargs):
    return CliRunner(mix_stderr=False).invoke(cli, list(args), **kwargs)


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_a_spinner_says_what_is_happening_only_once_it_takes_a_while_and_only_on_a_terminal():
    console, out = _terminal()
    with spinner("importing SkyPilot", console, after=0.05):
        time.sleep(0.4)
    assert "importing SkyPilot" in out.getvalue()

    console, quick = _terminal()
    with spinner("importing SkyPilot", console, after=0.3):
        pass
    time.sleep(0.4)  # the timer was cancelled: nothing appears later either
    assert quick.getvalue() == ""

    piped = io.StringIO()
    with spinner("importing SkyPilot", Console(file=piped, force_terminal=False), after=0.0):
        time.sleep(0.2)
    assert piped.getvalue() == ""


def test_the_core_says_what_takes_seconds_through_events_and_the_cli_shows_it_on_stderr():
    console, out = _terminal()
    status, shown = _terminal()
    events = RichEvents(console, status)
    with events.busy("building the bundle"):
        time.sleep(1.3)
    assert "building the bundle" in shown.getvalue() and out.getvalue() == ""
    with Events().busy("nothing to show"):  # the default hook does nothing
        pass
