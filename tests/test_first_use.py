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


def test_library_noise_goes_to_the_debug_log_redacted_and_the_streamed_log_keeps_ours(tmp_path):
    """What liger-kernel and dependencies print on every GPU run stays out of train.log; debug.log keeps
    every line, and a secret in a noise line is redacted there as everywhere."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    value = "hf_" + "DebugLogSecretValue" * 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("secrets: [HF_TOKEN]\n")
    debug = tmp_path / "out" / "debug.log"
    code = ("import os, sys, warnings\n"
            "from pathlib import Path\n"
            "from cloudtune.train.redacted_output import redacted_output, secret_values\n"
            f"with redacted_output(secret_values(Path({str(recipe)!r})), debug_log=Path({str(debug)!r})):\n"
            "    print('step 1/3 loss 5.52', flush=True)\n"
            "    os.write(2, b\"Backend impl 'liger_kernel.ops.backends._cutedsl.rope' for op 'rope' could not be \"\n"
            "             b\"imported: ImportError: cutedsl backend requires ...\\n\")\n"
            "    warnings.warn_explicit('invalid escape sequence', SyntaxWarning, "
            "'/venv/site-packages/somelib/util.py', 12)\n"
            "    warnings.warn_explicit('torch_dtype is deprecated, token ' + os.environ['HF_TOKEN'], "
            "FutureWarning, '/venv/site-packages/transformers/x.py', 3)\n"
            "    warnings.warn('eval_steps exceeds max_steps: no evaluation runs', UserWarning)\n"
            "    print('step 3/3 loss 1.20', flush=True)\n"
            "    print('cloudtune: token ' + os.environ['HF_TOKEN'], file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_TOKEN": value, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    streamed = done.stdout + done.stderr
    assert done.stdout.splitlines() == ["step 1/3 loss 5.52", "step 3/3 loss 1.20"]
    assert "liger" not in streamed and "SyntaxWarning" not in streamed and "FutureWarning" not in streamed
    assert "UserWarning: eval_steps exceeds max_steps" in done.stderr  # a warning that matters stays
    assert "cloudtune: token <redacted>" in done.stderr
    kept = debug.read_text()
    for line in ("step 1/3 loss 5.52", "Backend impl 'liger_kernel.ops.backends._cutedsl.rope'",
                 "somelib/util.py:12: SyntaxWarning: invalid escape sequence",
                 "FutureWarning: torch_dtype is deprecated, token <redacted>", "UserWarning: eval_steps"):
        assert line in kept
    assert value not in kept + streamed


def _complete(words: str) -> list[str]:
    """What bash completion offers for the last word of `words` (click's own completion protocol)."""
    done = CliRunner().invoke(cli, [], prog_name="cloudtune", env={
        "_CLOUDTUNE_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)})
    return [line.split(",", 1)[1] for line in done.output.splitlines()]


def test_shell_completion_knows_templates_backends_gpus_and_run_ids(ct_home):
    from cloudtune import templates
    from cloudtune.ledger import Ledger

    assert "demo-tiny" in _complete("cloudtune init --template d")
    assert set(_complete("cloudtune init -t ")) == set(templates.summaries())
    assert _complete("cloudtune run --backend s") == ["skypilot", "ssh"]
    assert _complete("cloudtune cost --gpu H10") == ["H100", "H100-PCIE", "H100-NVL"]
    assert _complete("cloudtune logs ") == ["last"]  # no ledger yet: nothing else, and no ledger is created
    assert not (ct_home / "ledger.db").exists()
    ledger = Ledger()
    first, second = ledger.add_new_run(name="demo", backend="local"), ledger.add_new_run(name="b", backend="local")
    assert set(_complete("cloudtune logs ")) == {"last", first, second}
    assert _complete(f"cloudtune down {first}") == [first]
    assert set(_complete("cloudtune run --resume 2")) == {first, second}
