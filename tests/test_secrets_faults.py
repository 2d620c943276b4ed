"""No secret leaves the places it must be; full disks, failed pulls and live tracker files fail cleanly.

Each test names the promise it backs (issue 15: secrets, faults).
"""
from __future__ import annotations

import json
import shlex
from urllib.parse import quote, quote_plus

import pytest

from cloudtune import secrets
from cloudtune.backends.base import secrets_env
from cloudtune.errors import CloudtuneError

SECRET = "hf_Q'uo\"te\\d/ 秘密&x=1"  # every character some encoding escapes


@pytest.fixture(autouse=True)
def _empty_registry():
    secrets.forget_all()
    yield
    secrets.forget_all()


@pytest.mark.parametrize("value", ["1234", "abcdefg", "12345678901", "password", "Changeme", "xxxxxxxxxx"])
def test_a_secret_too_short_or_common_to_redact_is_refused_by_name(value, monkeypatch):
    monkeypatch.setenv("MY_PIN", value)
    with pytest.raises(CloudtuneError) as refused:
        secrets.collect(["MY_PIN"])
    assert refused.value.exit_code == 2 and "MY_PIN" in str(refused.value)
    assert value not in str(refused.value)
    assert secrets.redact(f"x {value} y") == f"x {value} y"  # nothing refused was registered


def test_every_accepted_secret_is_redacted_whatever_its_length(monkeypatch):
    monkeypatch.setenv("SHORTISH", "k9#Lm2qZ")  # 8 characters: redacted, not skipped
    assert secrets.collect(["SHORTISH"]) == {"SHORTISH": "k9#Lm2qZ"}
    assert secrets.redact("token=k9#Lm2qZ.") == "token=<redacted>."


@pytest.mark.parametrize("encode", [
    str, repr, lambda v: repr(v)[1:-1], json.dumps, lambda v: json.dumps(v)[1:-1],
    lambda v: json.dumps(v, ensure_ascii=False), shlex.quote, lambda v: secrets_env({"X": v}).split("=", 1)[1],
    lambda v: quote(v, safe=""), quote, quote_plus, lambda v: json.dumps({"k": v}), lambda v: repr([v]),
], ids=["raw", "repr", "repr-inner", "json", "json-inner", "json-utf8", "shlex", "secrets.env", "url", "url-path",
        "url-plus", "json-in-object", "repr-in-list"])
def test_every_form_of_a_value_is_redacted(encode):
    text = f"before {encode(SECRET)} after"
    redacted = secrets.Redactor([SECRET])(text)
    assert "<redacted>" in redacted and redacted.startswith("before ") and redacted.endswith(" after")
    for form in secrets.forms(SECRET):
        assert form not in redacted
    assert "秘密" not in redacted and "Q'uo" not in redacted


def test_a_secret_containing_another_is_replaced_whole():
    redact = secrets.Redactor(["abcdefgh", "abcdefgh-ijklmnop"])
    assert redact("[abcdefgh-ijklmnop] [abcdefgh]") == "[<redacted>] [<redacted>]"


def test_an_error_quoting_user_data_never_echoes_a_secret(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cloudtune.cli import cli

    value = "tok_" + "ColumnNamedSecret" * 2
    monkeypatch.setenv("MYTOK", value)
    (tmp_path / "d.csv").write_text(f"{value},other\n1,2\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel:\n  init: tiny-llama\ndataset:\n  path: d.csv\nsecrets: [MYTOK]\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2 and "cannot tell the format" in result.output
    assert "<redacted>" in result.output and value not in result.output


def test_the_ledger_stores_error_text_redacted_before_it_is_cut(monkeypatch):
    from cloudtune.ledger import MAX_ERROR_CHARS, Ledger

    value = "sk-" + "LedgerSecret" * 3
    monkeypatch.setenv("API_KEY", value)
    secrets.collect(["API_KEY"])
    ledger = Ledger()
    ledger.add_run("r1", name="n", backend="local")
    cut_inside = "x" * (MAX_ERROR_CHARS - 10) + repr(value)  # the cut would fall inside the value
    ledger.update_run("r1", error=cut_inside)
    stored = ledger.get_run("r1")["error"]
    assert len(stored) == MAX_ERROR_CHARS and value[:8] not in stored
    assert value.encode() not in ledger.path.read_bytes()


# ------------------------------------------------------------------------------------------------
# outputs: a manifest of complete files only, installed all or nothing


def _training_out(root):
    """An out/ as the trainer leaves it, with W&B's offline folder that its service goes on writing."""
    from cloudtune import manifest

    out = root / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "run.json").write_text("{}")
    (out / "wandb" / "offline-run-1").mkdir(parents=True)
    (out / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"events")
    (out / "wandb" / "debug-internal.log").write_text("starting\n")
    manifest.write_manifest(out)
    with (out / "wandb" / "debug-internal.log").open("a") as log:  # still growing after the manifest
        log.write("shutting down\n")
    return out


def test_live_tracker_files_are_left_out_of_the_manifest_but_still_installed(tmp_path):
    import shutil

    from cloudtune import manifest

    out = _training_out(tmp_path)
    listed = json.loads((out / manifest.MANIFEST).read_text())
    assert set(listed["files"]) == {"adapter/adapter_model.safetensors", "run.json"}
    assert listed["unverified"] == ["wandb"]
    dest = tmp_path / "outputs" / "run1"
    manifest.install(lambda staging: shutil.copytree(out, staging, dirs_exist_ok=True), dest)
    assert (dest / "wandb" / "debug-internal.log").read_text() == "starting\nshutting down\n"
    assert (dest / "wandb" / "offline-run-1" / "run-1.wandb").read_bytes() == b"events"  # what `wandb sync` needs
    assert (dest / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"


def test_a_full_disk_while_installing_leaves_nothing_and_the_retry_succeeds(tmp_path):
    import errno
    import shutil

    from cloudtune import manifest

    out = _training_out(tmp_path)
    dest = tmp_path / "outputs" / "run1"

    def fills_the_disk(staging):
        staging.mkdir()
        shutil.copy2(out / "run.json", staging / "run.json")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CloudtuneError, match="No space left on device") as failed:
        manifest.install(fills_the_disk, dest)
    assert "pull again" in failed.value.hint
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial folder beside it either
    manifest.install(lambda staging: shutil.copytree(out, staging, dirs_exist_ok=True), dest)
    assert (dest / "run.json").is_file() and [p.name for p in dest.parent.iterdir()] == ["run1"]


def test_unlisted_or_corrupt_files_are_never_installed(tmp_path):
    import shutil

    from cloudtune import manifest

    out = _training_out(tmp_path)
    (out / "written-after-the-manifest.txt").write_text("partial")
    dest = tmp_path / "outputs" / "run1"
    manifest.install(lambda staging: shutil.copytree(out, staging, dirs_exist_ok=True), dest)
    assert not (dest / "written-after-the-manifest.txt").exists()
    (out / "run.json").write_text('{"changed": 1}')
    again = tmp_path / "outputs" / "run2"
    with pytest.raises(CloudtuneError, match="checksum mismatch"):
        manifest.install(lambda staging: shutil.copytree(out, staging, dirs_exist_ok=True), again)
    assert not again.exists()


# ------------------------------------------------------------------------------------------------
# through the local backend: the trainer redacts its own output; nothing secret stays on disk


def _files_holding(value: str, *roots) -> list[str]:
    forms = [form.encode() for form in (value, json.dumps(value), repr(value))]
    return [str(path) for root in roots for path in root.rglob("*")
            if path.is_file() and any(form in path.read_bytes() for form in forms)]


def test_a_secret_the_training_prints_is_stored_nowhere(tmp_path, ct_home, monkeypatch):
    from click.testing import CliRunner

    from cloudtune.cli import cli
    from cloudtune.ledger import Ledger

    from .conftest import demo_recipe_text, write_recipe

    work = tmp_path / "work"  # outputs land here; the user's own recipe (which names the value) is beside it
    work.mkdir()
    monkeypatch.chdir(work)
    value = "hf_" + "TrainerPrintsIt" * 2
    monkeypatch.setenv("HF_TOKEN", value)
    # The model path holds the token, so the training's own error (and traceback) prints it.
    text = demo_recipe_text(max_steps=2).replace("init: tiny-llama", f"name: /nonexistent/{value}")
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, text +
                                                                                      "secrets: [HF_TOKEN]\n"))])
    assert result.exit_code == 1 and "<redacted>" in result.output and value not in result.output
    run = Ledger().runs(1)[0]
    machine = ct_home / "runs" / run["id"] / "machine"
    assert "<redacted>" in (machine / "train.log").read_text()  # clean on disk, whoever reads it
    assert not (machine / "secrets.env").exists() and not (machine / "bundle").exists()
    assert not (ct_home / "runs" / run["id"] / "bundle.tar.gz").exists()
    assert _files_holding(value, ct_home, work) == []  # ledger, logs, outputs, staging: nothing
    status = CliRunner().invoke(cli, ["status", "--json"])
    assert json.loads(status.output)[0]["id"] == run["id"] and value not in status.output

    monkeypatch.delenv("HF_TOKEN")  # another shell, without the secret exported
    secrets.forget_all()
    logs = CliRunner().invoke(cli, ["logs", run["id"]])
    assert logs.exit_code == 0 and "<redacted>" in logs.output and value not in logs.output


def test_a_failed_pull_keeps_no_secret_and_no_partial_outputs_and_pull_then_works(tmp_path, ct_home, monkeypatch):
    import errno
    import shutil

    from click.testing import CliRunner

    from cloudtune.backends.local import LocalBackend
    from cloudtune.cli import cli
    from cloudtune.ledger import Ledger

    from .conftest import demo_recipe_text, write_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-" + "k3y" * 8)
    real_pull = LocalBackend.pull

    def disk_fills(self, ctx, staging):
        staging.mkdir()
        shutil.copy2(self.root(ctx) / "out" / "run.json", staging / "run.json")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalBackend, "pull", disk_fills)
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=2) + "secrets: [WANDB_API_KEY]\n")
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(recipe)])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    run = Ledger().runs(1)[0]
    machine = ct_home / "runs" / run["id"] / "machine"
    assert not (machine / "secrets.env").exists(), "secrets kept on a machine left up for `pull`"
    assert (machine / "out" / "manifest.json").is_file()  # the outputs wait on the machine
    outputs = tmp_path / "outputs" / "demo-tiny"
    assert not outputs.exists() or list(outputs.iterdir()) == []  # no partial output dir, no staging

    monkeypatch.setattr(LocalBackend, "pull", real_pull)  # space freed
    pulled = CliRunner().invoke(cli, ["pull", run["id"]])
    assert pulled.exit_code == 0, pulled.output
    assert (outputs / run["id"] / "adapter" / "adapter_model.safetensors").is_file()
    assert Ledger().get_run(run["id"])["status"] == "succeeded"
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated"
    assert sorted(p.name for p in machine.iterdir()) == ["exit_code", "train.log"]  # out/ goes once pulled


def test_the_cli_start_removes_the_secrets_of_runs_that_died(tmp_path, ct_home):
    import subprocess
    import sys

    from click.testing import CliRunner

    from cloudtune.cli import cli
    from cloudtune.ledger import Ledger

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ledger = Ledger()
    roots = {}
    # a training leads its own process group, as the local backend starts it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    for run_id, pid in (("dead-run", dead.pid), ("live-run", live.pid)):
        roots[run_id] = root = tmp_path / run_id
        (root / "bundle" / "data").mkdir(parents=True)
        (root / "out").mkdir()
        (root / "secrets.env").write_text("X='y'\n")
        (root / "train.log").write_text("log\n")
        ledger.add_run(run_id, name="n", backend="local")
        ledger.update_run(run_id, status="running")
        ledger.add_machine(f"ct-{run_id}", run_id, "local")
        ledger.set_machine(f"ct-{run_id}", "up", root=str(root), pid=pid)
    try:
        assert CliRunner().invoke(cli, ["status"]).exit_code == 0
        assert sorted(p.name for p in roots["dead-run"].iterdir()) == ["out", "train.log"]  # outputs wait for `pull`
        assert (roots["live-run"] / "secrets.env").exists() and (roots["live-run"] / "bundle").is_dir()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------------
# full disks: checked before anything starts; the ledger's errors are messages; the ledger stays right


def test_a_nearly_full_home_refuses_the_run_before_anything_starts(tmp_path, ct_home, monkeypatch):
    import shutil
    from collections import namedtuple

    from click.testing import CliRunner

    from cloudtune.cli import cli
    from cloudtune.ledger import Ledger

    from .conftest import demo_recipe_text, write_recipe

    monkeypatch.chdir(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 20 * 2**20, 20 * 2**20))
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, demo_recipe_text()))])
    assert result.exit_code == 2 and "only 20 MB free" in result.output and "Nothing was started" in result.output
    assert "Traceback" not in result.output
    assert Ledger().runs() == [] and list((ct_home / "runs").glob("*")) == []


class _FullDisk:
    """A SQLite connection on a disk that has just filled up: reads work, writes fail as SQLite says."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        if name == "_real":
            object.__setattr__(self, name, value)
        else:
            setattr(self._real, name, value)

    def execute(self, sql, params=()):
        import sqlite3

        if sql.split()[0] in ("INSERT", "UPDATE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._real.execute(sql, params)


def test_a_full_ledger_disk_is_one_message_and_exit_2(tmp_path, monkeypatch):
    import sqlite3

    from click.testing import CliRunner

    from cloudtune import ledger as ledger_module
    from cloudtune.cli import cli

    from .conftest import demo_recipe_text, write_recipe

    monkeypatch.chdir(tmp_path)
    real_connect = sqlite3.connect
    monkeypatch.setattr(ledger_module.sqlite3, "connect", lambda *a, **k: _FullDisk(real_connect(*a, **k)))
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, demo_recipe_text()))])
    assert result.exit_code == 2, result.output
    assert "database or disk is full" in result.output and "Free space where CLOUDTUNE_HOME is" in result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback


def test_a_ledger_write_failing_mid_start_still_tears_down_and_records_the_failure(tmp_path, ct_home, monkeypatch):
    from click.testing import CliRunner

    from cloudtune.cli import cli
    from cloudtune.ledger import Ledger, LedgerError
    from cloudtune.remote.stop_group import group_alive

    from .conftest import demo_recipe_text, write_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-" + "k3y" * 8)
    real_update = Ledger.update_run

    def full_once(self, run_id, **fields):
        if fields.get("status") == "running":  # the disk is full just as the training starts
            raise LedgerError("the ledger cannot be used: database or disk is full.")
        return real_update(self, run_id, **fields)

    monkeypatch.setattr(Ledger, "update_run", full_once)
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=100000) + "secrets: [WANDB_API_KEY]\n")
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(recipe)])
    assert result.exit_code == 2 and "database or disk is full" in result.output
    run = Ledger().runs(1)[0]
    machine = Ledger().machine_for_run(run["id"])
    assert run["status"] == "failed" and "disk is full" in run["error"]  # never left `running`
    assert machine["status"] == "terminated" and not group_alive(machine["meta"]["pid"])
    assert not (ct_home / "runs" / run["id"] / "machine" / "secrets.env").exists()


def test_the_trainer_redacts_what_native_code_and_children_write_too(tmp_path):
    import os
    import subprocess
    import sys

    value = "tok_" + "ChildProcessPrints" * 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("secrets: [MYTOK, NOT_SET]\n")
    code = ("import os, subprocess, sys\n"
            "from pathlib import Path\n"
            "from cloudtune.train.redacted_output import redacted_output, secret_values\n"
            f"with redacted_output(secret_values(Path({str(recipe)!r}))):\n"
            "    print('print', os.environ['MYTOK'])\n"
            "    os.write(2, ('native ' + repr(os.environ['MYTOK']) + '\\n').encode())\n"
            "    subprocess.run(['sh', '-c', 'echo child $MYTOK'], check=True)\n"
            "    sys.stdout.write('no newline ' + os.environ['MYTOK'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MYTOK": value})
    assert done.returncode == 0, done.stderr
    assert value not in done.stdout + done.stderr
    assert done.stdout.splitlines() == ["print <redacted>", "child <redacted>", "no newline <redacted>"]
    assert done.stderr == "native <redacted>\n"  # stderr stays stderr; the quoted repr goes whole
