"""What a new user meets between README and `down`: messages that say what happened and what to do,
commands that take SkyPilot's spellings, --json everywhere, and one error boundary for every entry point."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.ledger import Ledger, machine_name
from cloudtune.planning.gpus import split_gpu_count
from cloudtune.recipe import load_recipe

from .conftest import DEMO_RECIPE, REPO, demo_recipe_text, sky_env, write_recipe
from .test_run_local import start_long_local_run, wait_gone


def invoke(*args: str, **kwargs):
    return CliRunner(mix_stderr=False).invoke(cli, list(args), **kwargs)


def test_a_finished_run_pulled_again_says_where_its_outputs_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = invoke("run", "--backend", "local", "--json", str(write_recipe(tmp_path, demo_recipe_text(max_steps=3))))
    assert done.exit_code == 0, done.stderr
    out = json.loads(done.stdout)["output_dir"]

    pulled = invoke("pull", "last")
    assert pulled.exit_code == 0, pulled.stderr
    assert pulled.stdout.strip() == f"already pulled: outputs at {out}"
    again = json.loads(invoke("pull", "last", "--json").stdout)
    assert again["already_pulled"] is True and again["output_dir"] == out and again["actual_cost_usd"] == 0.0

    lines = [json.loads(line) for line in invoke("logs", "--json").stdout.splitlines()]
    assert lines and {line["run_id"] for line in lines} == {Path(out).name}
    assert any("step 3/3" in line["line"] for line in lines)
    nothing = json.loads(invoke("down", "--json").stdout)
    assert nothing == {"machines": [], "torn_down": [], "problems": []}


def a_run_with_a_machine(status: str, error: str | None = None) -> str:
    """A run as the ledger keeps it, with its local "machine" row; nothing runs."""
    ledger = Ledger()
    run_id = ledger.add_new_run(name="demo", backend="local")
    ledger.update_run(run_id, status=status, error=error)
    ledger.add_machine(machine_name(run_id), run_id, "local")
    ledger.set_machine(machine_name(run_id), "up")
    return run_id


def test_the_log_of_a_run_that_failed_before_training_says_why_it_is_empty():
    run_id = a_run_with_a_machine("failed", "dataset.path: no file data/chat.jsonl\nmore detail")
    shown = invoke("logs", run_id)
    assert shown.exit_code == 0 and shown.stdout == ""
    assert " ".join(shown.stderr.split()) == (f"no log: run {run_id} failed before its training wrote a line: "
                                              "dataset.path: no file data/chat.jsonl")


def test_down_asks_first_and_no_is_the_default():
    run_id = a_run_with_a_machine("running")
    asked = invoke("down", input="\n")
    assert asked.exit_code == 0 and "[y/N]" in asked.stdout and "nothing torn down" in asked.stderr
    assert machine_name(run_id) in asked.stdout
    assert Ledger().machine_for_run(run_id)["status"] == "up"
    refused = invoke("down", "--json")
    assert "--json needs --yes" in refused.stderr and Ledger().machine_for_run(run_id)["status"] == "up"
    listed = json.loads(invoke("down", "--dry-run", "--json").stdout)
    assert [machine["name"] for machine in listed["machines"]] == [machine_name(run_id)]


def test_a_run_stopped_by_down_from_another_terminal_says_so(tmp_path, ct_home):
    cli_process, run, pgid, seen = start_long_local_run(tmp_path)
    down = invoke("down", run["id"], "--yes")
    assert down.exit_code == 0, down.stdout + down.stderr
    rest = cli_process.communicate(timeout=120)[0]
    assert cli_process.returncode == 1, "".join(seen) + rest
    assert "stopped by `cloudtune down` (from another terminal)" in " ".join(rest.split())
    assert "killed?" not in rest and wait_gone(pgid, 10)
    assert Ledger().get_run(run["id"])["status"] == "cancelled"


def test_mistyped_commands_and_backends_get_a_did_you_mean_before_anything_else():
    typo = invoke("stauts")
    assert typo.exit_code == 2 and "Did you mean status?" in typo.stderr
    # refused while the command line is read: before the recipe (here missing) is looked at
    backend = invoke("run", "--backend", "sssh", "no-such-recipe.yaml")
    assert backend.exit_code == 2, backend.stderr
    assert "unknown backend 'sssh'" in backend.stderr and "Did you mean ssh?" in backend.stderr
    assert "no-such-recipe" not in backend.stderr


def test_gpu_name_count_and_cloud_lists_take_skypilots_spellings(tmp_path, ct_home):
    assert split_gpu_count("H100:8") == ("H100", 8) and split_gpu_count("A10") == ("A10", None)
    bad = invoke("cost", "--gpu", "A10:x", str(DEMO_RECIPE))
    assert bad.exit_code == 2 and "--gpu A10:x" in bad.stderr and "whole number" in bad.stderr
    (tmp_path / "home").mkdir()
    env = sky_env(tmp_path / "home", ct_home)
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=3))
    # the count reaches the plan: no catalog offer has three T4s on AWS or GCP
    three = subprocess.run([sys.executable, "-m", "cloudtune.cli", "cost", "--gpu", "T4:3", "--cloud", "aws,gcp",
                            str(recipe)], env=env, capture_output=True, text=True, timeout=300)
    assert three.returncode == 2 and "3× T4" in three.stderr and "on aws, gcp" in three.stderr, three.stderr
    one = subprocess.run([sys.executable, "-m", "cloudtune.cli", "cost", "--gpu", "T4:1", "--cloud", "aws,gcp",
                          "--json", str(recipe)], env=env, capture_output=True, text=True, timeout=300)
    offers = [e["offer"] for e in json.loads(one.stdout)["estimates"]]
    assert offers and {(o["gpu"], o["gpu_count"]) for o in offers} == {("T4", 1)}
    assert {o["cloud"] for o in offers} <= {"aws", "gcp"}


def test_optional_run_arguments_read_as_optional():
    for command in ("logs", "down"):
        assert f" {command} [OPTIONS] [RUN]\n" in invoke(command, "--help").stdout


def test_init_writes_a_recipe_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = invoke("init", "chat.yaml")
    assert first.exit_code == 0, first.stderr
    text = (tmp_path / "chat.yaml").read_text()
    assert "cloudtune run --backend local chat.yaml" in text and "tasks/demo-tiny.yaml" not in text
    assert load_recipe(tmp_path / "chat.yaml").run_name == "chat"  # named after its file
    assert "wrote data/demo-chat.jsonl" in first.stdout

    mine = tmp_path / "data" / "demo-chat.jsonl"
    mine.write_text('{"text": "my own data"}\n')
    second = invoke("init", "other.yaml", "--json")
    assert json.loads(second.stdout)["kept"] == ["data/demo-chat.jsonl"]
    assert mine.read_text() == '{"text": "my own data"}\n'  # never overwritten
    third = invoke("init", "third.yaml")
    assert "kept your data/demo-chat.jsonl as it is" in third.stdout

    (tmp_path / "sub").mkdir()
    folder = invoke("init", "sub", "--force")
    assert folder.exit_code == 2 and "sub is a folder" in folder.stderr and "Traceback" not in folder.stderr
    listed = json.loads(invoke("init", "--list", "--json").stdout)
    assert "demo-tiny" in listed and "Offline demo" in listed["demo-tiny"]


def test_unexpected_errors_are_one_message_and_a_traceback_only_with_debug(monkeypatch):
    """A bug stands in for whatever may break inside a command: the ledger read raises."""
    from cloudtune import lifecycle

    def broken(_limit):
        raise RuntimeError("the ledger row is not what this version expects")

    monkeypatch.setattr(lifecycle, "recent_runs", broken)
    plain = invoke("status")
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr
    assert "error: unexpected RuntimeError: the ledger row is not what this version expects" in plain.stderr
    assert "--debug" in plain.stderr
    debug = invoke("--debug", "status")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "RuntimeError" in debug.stderr


@pytest.mark.parametrize("module", ["cloudtune.train.verify", "cloudtune.reference"])
def test_python_m_entry_points_share_the_boundary(module, tmp_path):
    def python_m(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                              cwd=REPO)

    helped = python_m("--help")
    assert helped.returncode == 0 and f"python -m {module}" in helped.stdout, helped.stderr
    wrong = python_m(str(tmp_path / "nothing-here"))
    assert wrong.returncode == 2 and "error:" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "Traceback" in python_m(str(tmp_path / "nothing-here"), "--debug").stderr
