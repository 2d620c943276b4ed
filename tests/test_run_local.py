"""The spine end to end on the local backend: run, receipt, ledger, adapter reload, failure, cancel."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.ledger import Ledger

from .conftest import demo_recipe_text, process_group_alive, write_recipe


def test_demo_from_init_runs_as_init_says_and_the_adapter_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "demo.yaml"
    init = CliRunner().invoke(cli, ["init", str(recipe)])
    assert init.exit_code == 0, init.output
    assert (tmp_path / "data" / "demo-chat.jsonl").is_file()
    command = init.output.strip().splitlines()[-1].split()  # init's last line: the run command, whole
    assert command == ["cloudtune", "run", "--backend", "local", str(recipe)]
    priced = json.loads(CliRunner().invoke(cli, ["cost", "--json", str(recipe)]).stdout)
    result = CliRunner().invoke(cli, [*command[1:-1], "--json", command[-1]])
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.stdout[result.stdout.index("{"):])
    out = Path(receipt["output_dir"])
    assert out.parent == (tmp_path / "outputs" / "demo").resolve()  # named after the user's file
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl",
                 "run.json", "receipt.json", "manifest.json", "samples.jsonl"):
        assert (out / name).is_file(), name

    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 300
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:5]) / 5, "loss did not go down"
    # the demo visibly learns: Bob answers each sample's question as the chat taught him, and did not before
    chats = [json.loads(line)["text"] for line in (tmp_path / "data" / "demo-chat.jsonl").read_text().splitlines()]
    taught = dict(turn for chat in chats for turn in re.findall(r"### Alice: (.*)\n### Bob: (.*)", chat))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    for sample in samples:
        answer = taught[re.search(r"### Alice: (.*)\n### Bob:$", sample["prompt"]).group(1)]
        assert sample["tuned"].split("\n")[0].strip() == answer, sample
        assert answer not in sample["base"], sample
    assert receipt["tokens"] > 0 and receipt["tokens_per_s"] > 0
    assert priced["tokens_exact"] and receipt["tokens"] == priced["tokens"], "cost priced the tokens that were trained"

    from cloudtune.train.model import tiny_llama_dir
    from cloudtune.train.verify import max_logit_difference

    assert max_logit_difference(out, str(tiny_llama_dir())) < 1e-4

    run = Ledger().get_run(receipt["run_id"])
    assert run["status"] == "succeeded" and run["tokens"] == receipt["tokens"]
    machine = Ledger().machine_for_run(receipt["run_id"])
    assert machine["name"] == f"ct-{receipt['run_id']}" and machine["status"] == "terminated"

    status = CliRunner().invoke(cli, ["status", "--json"])
    assert json.loads(status.output)[0]["id"] == receipt["run_id"]
    logs = CliRunner().invoke(cli, ["logs", receipt["run_id"][:15]])
    assert "step 300/300" in logs.output


def test_failed_training_is_recorded_with_the_log_tail(tmp_path, monkeypatch):
    """A machine that looks as if it had an NVIDIA GPU passes the local backend's check, and its trainer,
    which finds none, refuses qlora: the failure the trainer reports, as any other."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cloudtune.backends.local.may_have_an_nvidia_gpu", lambda: True)
    text = demo_recipe_text(max_steps=5).replace("method: lora", "method: qlora")
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, text))])
    assert result.exit_code == 1, result.output
    assert "exited with status 2" in result.output
    assert "needs an NVIDIA GPU" in result.output  # the tail of the training log is shown
    run = Ledger().runs(1)[0]
    assert run["status"] == "failed" and "needs an NVIDIA GPU" in run["error"]
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated"
    assert not (tmp_path / "outputs" / "demo-tiny" / run["id"]).exists()


def test_qlora_on_a_machine_without_an_nvidia_gpu_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cloudtune.backends.local.may_have_an_nvidia_gpu", lambda: False)
    recipe = str(write_recipe(tmp_path, demo_recipe_text(max_steps=5).replace("method: lora", "method: qlora")))
    result = CliRunner(mix_stderr=False).invoke(cli, ["run", "--backend", "local", recipe])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("needs an NVIDIA GPU") == 1 and "Traceback" not in result.stderr  # said once
    assert "bundle" not in result.stdout and "provision" not in result.stdout  # nothing bundled or started
    assert Ledger().runs() == []


def start_long_local_run(tmp_path: Path, **training) -> tuple[subprocess.Popen, dict, int, list[str]]:
    """`cloudtune run --backend local` in its own process, returned once training has begun."""
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=100000, **training))
    cli_process = subprocess.Popen([sys.executable, "-m", "cloudtune.cli", "run", "--backend", "local", str(recipe)],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "COLUMNS": "200"})
    seen = []
    for line in cli_process.stdout:
        seen.append(line)
        if "step " in line:
            break
    run = Ledger().runs(1)[0]
    pgid = Ledger().machine_for_run(run["id"])["meta"]["pid"]  # the run script leads the training's group
    assert process_group_alive(pgid)
    return cli_process, run, pgid, seen


def wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while process_group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)
    return not process_group_alive(pgid)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_sigterm_and_sighup_cancel_stop_the_training_and_are_recorded(tmp_path, ct_home, sent):
    cli_process, run, pgid, seen = start_long_local_run(tmp_path)
    cli_process.send_signal(sent)
    rest = cli_process.communicate(timeout=120)[0]
    assert cli_process.returncode == 128 + sent, "".join(seen) + rest
    if sent != signal.SIGHUP:  # a hung-up terminal gets nothing more
        assert f"interrupted ({sent.name})" in rest
    assert wait_gone(pgid, 10), "training outlived the cancelled run"
    run = Ledger().get_run(run["id"])
    assert run["status"] == "cancelled"
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated"
    assert (Path(run["meta"]["checkpoint"]) / "state.pt").is_file(), "the stopped run keeps what it trained"


def test_a_killed_cli_takes_its_training_down_and_down_cleans_up(tmp_path, ct_home):
    cli_process, run, pgid, _ = start_long_local_run(tmp_path, checkpoint_steps=1000)
    cli_process.kill()  # SIGKILL: no handler runs, only the training's watchdog notices
    cli_process.wait()
    assert wait_gone(pgid, 30), "training outlived the CLI that started it"
    log = (ct_home / "runs" / run["id"] / "machine" / "train.log").read_text()
    assert "is gone; stopping with a checkpoint" in log
    status = CliRunner().invoke(cli, ["status"], env={"COLUMNS": "200"})
    assert "its CLI is gone" in status.output, status.output
    down = CliRunner().invoke(cli, ["down", run["id"], "--yes"])
    assert down.exit_code == 0 and "terminated" in down.output, down.output
    assert Ledger().get_run(run["id"])["status"] == "cancelled"
    assert f"cloudtune run --resume {run['id']}" in " ".join(down.output.split()), "down keeps its checkpoint too"


def test_run_ids_never_collide_in_one_ledger(ct_home, monkeypatch):
    from cloudtune import ledger as ledger_module

    ids = iter(["20260101-000000-aaaaaa", "20260101-000000-aaaaaa", "20260101-000000-bbbbbb"])
    monkeypatch.setattr(ledger_module, "new_run_id", lambda: next(ids))
    ledger = Ledger()
    first = ledger.add_new_run(name="one", backend="local")
    second = ledger.add_new_run(name="two", backend="local")
    assert (first, second) == ("20260101-000000-aaaaaa", "20260101-000000-bbbbbb")


def test_secret_values_are_redacted_from_terminal_and_ledger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    secret = "hf_" + "s3cr3tValue" * 3
    monkeypatch.setenv("HF_TOKEN", secret)
    # The training fails loading a model whose path holds the token, so the token lands in its log and error.
    text = demo_recipe_text(max_steps=2).replace("init: tiny-llama", f"name: /nonexistent/{secret}")
    text += "secrets: [HF_TOKEN]\n"
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, text))])
    assert result.exit_code == 1
    assert "<redacted>" in result.output and secret not in result.output
    run = Ledger().runs(1)[0]
    assert "<redacted>" in run["error"]
    assert secret.encode() not in (Path(os.environ["CLOUDTUNE_HOME"]) / "ledger.db").read_bytes()
    machine_root = Path(os.environ["CLOUDTUNE_HOME"]) / "runs" / run["id"] / "machine"
    assert (machine_root / "train.log").is_file()
    assert not (machine_root / "secrets.env").exists(), "secrets file left behind after teardown"


def test_missing_secret_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    text = demo_recipe_text(max_steps=2) + "secrets: [WANDB_API_KEY]\n"
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, text))])
    assert result.exit_code == 2 and "WANDB_API_KEY" in result.output
    assert Ledger().runs() == []  # nothing was started


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["status"]])
def test_cli_stays_light(command, tmp_path):
    code = (f"import sys; from cloudtune.cli import main; sys.argv=['cloudtune', *{command!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'sky', 'peft', 'paramiko', 'matplotlib', 'gguf')\n"
            "         if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ}).stdout
    assert "HEAVY []" in output, output


def test_max_cost_stops_the_training_with_its_outputs_so_far(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = demo_recipe_text(max_steps=100000) + "compute:\n  price_per_hour: 3600\n  max_cost: 6\n"
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(write_recipe(tmp_path, text))],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "stops with its outputs so far after" in result.output
    run = Ledger().runs(1)[0]
    out = Path(run["output_dir"])
    stop = json.loads((out / "run.json").read_text())["budget_stop"]
    assert stop["max_cost"] == 6 and 1 <= stop["stopped_at_step"] < 100000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "max_cost $6.00 spent: stopped after step" in " ".join(result.output.split())
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["estimate"]["usd_per_hour"] == 3600 and receipt["actual_cost_usd"] > 0
    assert run["status"] == "succeeded" and Ledger().machine_for_run(run["id"])["status"] == "terminated"


def test_a_run_max_cost_stopped_resumes_from_its_kept_checkpoint_on_a_new_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = demo_recipe_text(max_steps=100000) + "compute:\n  price_per_hour: 3600\n  max_cost: 4\n"
    recipe = write_recipe(tmp_path, text)
    first = CliRunner().invoke(cli, ["run", "--backend", "local", str(recipe)], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    earlier = Ledger().runs(1)[0]
    stopped_at = json.loads((Path(earlier["output_dir"]) / "run.json").read_text())["budget_stop"]["stopped_at_step"]
    kept = Path(earlier["meta"]["checkpoint"])
    assert kept.name == f"step-{stopped_at:08d}" and (kept / "state.pt").is_file()
    assert not (kept.parent.parent / "machine" / "out").exists(), "the machine itself is cleaned as usual"
    assert f"cloudtune run --resume {earlier['id']}" in " ".join(first.output.split())

    changed = write_recipe(tmp_path, text.replace("learning_rate: 0.01", "learning_rate: 0.02"), "changed.yaml")
    refused = CliRunner().invoke(cli, ["run", "--resume", earlier["id"], str(changed)])
    assert refused.exit_code == 2 and "no longer trains what run" in refused.output, refused.output
    assert len(Ledger().runs(10)) == 1, "nothing was started for a resume that cannot work"

    again = CliRunner().invoke(cli, ["run", "--resume", earlier["id"][:12], "--max-cost", "4"], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    later = Ledger().runs(1)[0]
    assert later["id"] != earlier["id"] and later["meta"]["continues"] == earlier["id"]
    assert Ledger().get_run(earlier["id"])["meta"]["continued_by"] == later["id"]
    log = CliRunner().invoke(cli, ["logs", later["id"]]).output
    assert f"resumed from step {stopped_at}\n" in log, log
    out = Path(later["output_dir"])
    assert json.loads((out / "run.json").read_text())["budget_stop"]["stopped_at_step"] > stopped_at
    first_step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"]
    assert first_step == stopped_at + 1, "the continuation trains on from the kept step, not from zero"


def test_resume_of_a_run_that_kept_no_checkpoint_is_refused(tmp_path, monkeypatch):
    ledger = Ledger()
    run_id = ledger.add_new_run(name="done", backend="local", recipe_path="", recipe_hash="x")
    ledger.update_run(run_id, status="succeeded")
    result = CliRunner().invoke(cli, ["run", "--resume", run_id])
    assert result.exit_code == 2 and "kept no checkpoint" in result.output, result.output
