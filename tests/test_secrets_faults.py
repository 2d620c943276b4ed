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
