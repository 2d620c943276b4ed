"""Several training processes on the CPU with gloo, started the way every backend starts them: the launcher
(cloudtune/remote/launch.py) and torchrun. Each run costs a torch start per rank, so the cases are few and
each one checks much: equal losses, resume, the outputs, the failure paths.
"""
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
import torch
import yaml

from cloudtune.ledger import Ledger
from cloudtune.recipe import load_recipe
from cloudtune.remote.launch import GPU_COUNT_ENV, Layout, layout_from_env, trainer_command, visible_gpus
from cloudtune.train.distributed import PREFLIGHT_TIMEOUT_S
from cloudtune.train.loop import train
from cloudtune.train.model import tiny_llama_dir
from cloudtune.train.verify import main as verify_main
from cloudtune.train.verify import max_logit_difference

from .conftest import demo_recipe_text, free_port, process_group_alive, write_recipe
from .test_train import ALPACA, make_recipe, metrics, weights

REPO = Path(__file__).resolve().parent.parent
STEPS = 10
EVAL_ROWS = 5  # unpacked, 3 eval micro-batches of 2 rows: 2 ranks get unequal shares


# ----------------------------------------------------------------------------------------------
# the launch command, for every layout


def test_one_process_is_the_trainer_itself_and_several_go_through_torchrun():
    args = ["bundle/recipe.yaml", "--out", "out", "--resume"]
    assert trainer_command("py", args, Layout()) == ["py", "-u", "-m", "cloudtune.train", *args]
    assert trainer_command("py", args, Layout(nproc_per_node=4)) == [
        "py", "-u", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
        "--shutdown-timeout", "120", "-m", "cloudtune.train", *args]
    assert trainer_command("py", args, Layout(8, nnodes=2, node_rank=1, master_addr="10.0.0.1")) == [
        "py", "-u", "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
        "--master-addr", "10.0.0.1", "--master-port", "29500", "--shutdown-timeout", "120", "-m",
        "cloudtune.train", *args]


def test_the_layout_comes_from_skypilot_the_recipe_or_the_machine():
    sky = {"SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2",
           "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    assert layout_from_env(sky) == Layout(8, nnodes=2, node_rank=1, master_addr="10.0.0.5")
    assert layout_from_env({GPU_COUNT_ENV: "2", "CUDA_VISIBLE_DEVICES": ""}) == Layout(2)  # CPU: 2 gloo processes
    assert layout_from_env({"CUDA_VISIBLE_DEVICES": "0,3,5"}) == Layout(3)  # unset: every GPU it may use
    assert layout_from_env({"CUDA_VISIBLE_DEVICES": ""}) == Layout(1)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


# ----------------------------------------------------------------------------------------------
# real runs


def recipes(folder: Path, ranks: int = 2, **training) -> tuple[Path, Path]:
    """The same global batch of `ranks` micro-batches per step: one process accumulating them, or `ranks` ranks
    with 1 each."""
    common = dict(lora={"r": 8, "alpha": 16, "dropout": 0.0}, dataset={"eval": EVAL_ROWS},
                  outputs={"samples": ["What is 3 plus 4?"], "sample_max_new_tokens": 4},
                  training={"max_steps": STEPS, "micro_batch_size": 2, "max_seq_len": 160, "eval_steps": 5,
                            **training})
    one = make_recipe(folder / "one", ALPACA, **{**common, "training": {**common["training"],
                                                                        "gradient_accumulation": ranks}})
    many = make_recipe(folder / "many", ALPACA, **{**common, "training": {**common["training"],
                                                                          "gradient_accumulation": 1}})
    return one, many


def launch(recipe: Path, out: Path, *extra: str, ranks: int = 2, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cloudtune.remote.launch", str(recipe), "--out", str(out), *extra],
                            env={**os.environ, "PYTHONPATH": str(REPO), GPU_COUNT_ENV: str(ranks), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_pid(out: Path, rank: int) -> int:
    """The process of one rank of the training into `out` (torchrun's child, in a session of its own)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, UnicodeDecodeError):
            continue
        if "cloudtune.train" in cmdline and "--out" in cmdline and f"RANK={rank}".encode() in environ \
                and cwd / cmdline[cmdline.index("--out") + 1] == out:
            return int(pid)
    raise AssertionError(f"no rank {rank} training into {out}")


def ranks_alive(out: Path) -> list[int]:
    alive = []
    for rank in (0, 1):
        try:
            alive.append(rank_pid(out, rank))
        except AssertionError:
            pass
    return alive


def read_until(process: subprocess.Popen, prefix: str) -> list[str]:
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"never printed {prefix!r}:\n{''.join(seen)}")


def assert_same_steps(out: Path, reference: Path, steps: int = STEPS) -> None:
    mine, theirs = metrics(out), metrics(reference)
    assert [row["step"] for row in mine] == list(range(1, steps + 1))
    for key in ("step_tokens", "trained_tokens", "tokens"):
        assert [row[key] for row in mine] == [row[key] for row in theirs], key
    # several processes sum their shares of each step's loss in another order than one process does
    assert [row["loss"] for row in mine] == pytest.approx([row["loss"] for row in theirs], rel=1e-4)
    evals = [[row["eval_loss"] for row in rows if "eval_loss" in row] for rows in (mine, theirs)]
    assert evals[1] and evals[0] == pytest.approx(evals[1], rel=1e-4)


def assert_eval_shared(out: Path, reference: Path, ranks: int) -> None:
    """Each rank evaluated its own share of the eval micro-batches (equal losses alone would not show it:
    every rank evaluating all of them gets the same loss)."""
    alone = json.loads((reference / "run.json").read_text())["eval"]["micro_batches_per_rank"]
    shares = json.loads((out / "run.json").read_text())["eval"]["micro_batches_per_rank"]
    assert shares == [len(range(rank, alone[0], ranks)) for rank in range(ranks)] and len(alone) == 1, (shares, alone)


def assert_same_weights(out: Path, reference: Path) -> None:
    adapter = weights(out / "adapter" / "adapter_model.safetensors")
    expected = weights(reference / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, atol=1e-4, rtol=1e-3)
    assert max_logit_difference(out, str(tiny_llama_dir())) < 1e-4  # what `cloudtune verify` checks
    mine, theirs = (json.loads((folder / "samples.jsonl").read_text()) for folder in (out, reference))
    assert mine["base"] == theirs["base"]  # the same base model, generated before any step


def reference_run(shared_home: Path, tmp_path_factory, ranks: int, **training) -> tuple[Path, Path, Path]:
    """(the one-process recipe, the recipe for `ranks` ranks, the output of the one-process recipe), trained in
    this process (torch is loaded already)."""
    from .conftest import module_home

    with module_home(shared_home, tmp_path_factory):
        folder = tmp_path_factory.mktemp(f"dist-{ranks}")
        one, many = recipes(folder, ranks, **training)
        train(load_recipe(one), folder / "reference")
    return one, many, folder / "reference"


@pytest.fixture(scope="module")
def reference(shared_home, tmp_path_factory) -> tuple[Path, Path, Path]:
    return reference_run(shared_home, tmp_path_factory, 2, checkpoint_steps=2)


THREE_STEPS = 4  # 3 ranks on a 2-core machine: a few steps of one row per rank show the split; each costs


@pytest.fixture(scope="module")
def reference_of_three(shared_home, tmp_path_factory) -> tuple[Path, Path, Path]:
    return reference_run(shared_home, tmp_path_factory, 3, max_steps=THREE_STEPS, micro_batch_size=1)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume_trains_what_one_process_does(
        tmp_path, reference, parallelism):
    """DDP is what auto picks on the CPU; FSDP shards the model, and its checkpoint gathers every rank's shards.
    A run stopped and resumed ends where one uninterrupted process does, so this covers the plain run too."""
    _one, two, expected = reference
    if parallelism == "fsdp":
        two = recipes(tmp_path / "fsdp", parallelism="fsdp", checkpoint_steps=2)[1]
    out = tmp_path / "out"
    started = launch(two, out)
    seen = read_until(started, "training: ")
    second = rank_pid(out, 1)
    seen += read_until(started, "step 2/")
    os.kill(second, signal.SIGTERM)  # not rank 0, which writes everything
    rest = started.communicate(timeout=120)[0]
    log = "".join(seen) + rest
    assert started.returncode == 143, log
    assert f"{parallelism} over 2 ranks" in log
    step = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert step < STEPS and (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()
    assert not (out / "run.json").exists() and ranks_alive(out) == []

    resumed = launch(two, out, "--resume")
    log = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, log
    assert f"resumed from step {step}" in log
    assert log.count(f"step {STEPS}/{STEPS}") == 1, "only rank 0 prints the step lines"
    assert_same_steps(out, expected)
    assert_same_weights(out, expected)
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["nodes"], run["parallelism"]) == (2, 1, parallelism)
    assert run["tokens_per_s"] == pytest.approx(2 * run["tokens_per_s_per_gpu"], rel=0.01)
    assert_eval_shared(out, expected, 2)


# A sitecustomize for the ranks: an audit hook notes, in a file per rank, each time that rank opens one file.
# It changes nothing the training does; it only shows who read what.
OPENS_HOOK = """
import os, sys
if "RANK" in os.environ:  # a rank torchrun started, not the launcher or torchrun itself
    def _note(event, args, watched=os.environ["CT_TEST_WATCHED"],
              log=os.path.join(os.environ["CT_TEST_OPENS"], "rank-" + os.environ["RANK"])):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and os.path.abspath(args[0]) == watched:
            with open(log, "a") as notes:
                notes.write("opened\\n")
    sys.addaudithook(_note)
"""


def watching_opens(path: Path, folder: Path) -> dict[str, str]:
    """The environment of a launch whose ranks note in folder/rank-N whenever they open `path`."""
    (folder / "hook").mkdir(parents=True)
    (folder / "hook" / "sitecustomize.py").write_text(OPENS_HOOK)
    (folder / "opens").mkdir()
    return {"PYTHONPATH": f"{folder / 'hook'}{os.pathsep}{REPO}", "CT_TEST_WATCHED": str(path.resolve()),
            "CT_TEST_OPENS": str(folder / "opens")}


def test_three_ddp_ranks_train_what_one_process_does_and_the_adapter_verifies(tmp_path, reference_of_three, capsys):
    """An odd world size: a step's micro-batches split 3 ways, and every rank's share counts once. Rank 0 alone
    reads and tokenizes the dataset; the others train on what it sends them."""
    _one, three, expected = reference_of_three
    out = tmp_path / "out"
    # a home without the tiny model: every rank writes it at once (transformers' save_pretrained writes only
    # on rank 0 under torch.distributed; a rank that used it once left a model folder without weights)
    fresh = tmp_path / "fresh-home"
    watched = watching_opens(three.parent / "data.jsonl", tmp_path)
    done = launch(three, out, ranks=3, CLOUDTUNE_HOME=str(fresh), **watched)
    log = done.communicate(timeout=180)[0]
    assert done.returncode == 0, log
    assert sorted(os.listdir(fresh / "models")) == ["tiny-llama-v1"]  # the ranks' scratch copies are gone
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(fresh / "models/tiny-llama-v1"))
    assert "ddp over 3 ranks" in log
    assert sorted(os.listdir(tmp_path / "opens")) == ["rank-0"]
    assert_same_steps(out, expected, THREE_STEPS)
    assert_same_weights(out, expected)
    # `python -m cloudtune.train.verify`'s main, in this process: another start of torch would cost ~10 s here
    assert verify_main([str(out)]) == 0
    assert "matches the end of training" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["parallelism"]) == (3, "ddp")
    assert_eval_shared(out, expected, 3)


def test_a_dataset_error_on_rank_0_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 alone reads the data; the others must not wait for data that never comes."""
    recipe = make_recipe(tmp_path, ALPACA, dataset={"completions_only": True}, training={"max_seq_len": 16})
    done = launch(recipe, tmp_path / "out")
    log = done.communicate(timeout=120)[0]
    assert done.returncode == 2, log
    assert log.count("error: no training row has an answer token within max_seq_len=16") == 1, log
    assert "rank 1: no training row" not in log  # rank 1 stops with rank 0's error and leaves the telling to it
    assert "ended without an exit status" not in log and "Traceback" not in log, log


def start_local_run(tmp_path: Path) -> tuple[subprocess.Popen, str, int, list[str]]:
    """`cloudtune run --backend local` of a long 2-rank run, once it trains: its CLI, run id and rank 1."""
    data = yaml.safe_load(demo_recipe_text(max_steps=100000, max_seq_len=128))
    data["compute"] = {"gpu_count": 2}
    recipe = write_recipe(tmp_path, yaml.safe_dump(data))
    cli = subprocess.Popen([sys.executable, "-m", "cloudtune.cli", "run", "--backend", "local", str(recipe)],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    seen = []
    for line in cli.stdout:
        seen.append(line)
        if "step 1/" in line:
            break
    run_id = Ledger().runs(1)[0]["id"]
    out = Path(os.environ["CLOUDTUNE_HOME"]) / "runs" / run_id / "machine" / "out"
    return cli, run_id, rank_pid(out, 1), seen


def test_a_killed_rank_ends_the_run_with_a_clear_error_and_the_machine_is_torn_down(tmp_path):
    cli, run_id, second, seen = start_local_run(tmp_path)
    t0 = time.time()
    os.kill(second, signal.SIGKILL)
    rest = cli.communicate(timeout=150)[0]
    output = "".join(seen) + rest
    assert cli.returncode == 1, output
    assert time.time() - t0 < 60, "the run outlived a dead rank"
    # rank 0 may be stopped by torchrun before it notices the loss: then it is named too, and has no account
    dead = re.search(r"local rank\(s\) (0, )?1 ended without an exit status", output)
    assert dead, output
    assert "Traceback" not in output and "torch/distributed" not in output, output  # torchrun's, in torchrun.log
    if not dead.group(1):
        assert "lost contact with the other ranks" in output, output  # rank 0's own account, in the log's tail
    assert Ledger().get_run(run_id)["status"] == "failed"
    assert Ledger().machine_for_run(run_id)["status"] == "terminated"
    assert ranks_alive(Path(os.environ["CLOUDTUNE_HOME"]) / "runs" / run_id / "machine" / "out") == []


def test_a_killed_cli_leaves_no_rank_alive(tmp_path):
    cli, run_id, _second, _seen = start_local_run(tmp_path)
    out = Path(os.environ["CLOUDTUNE_HOME"]) / "runs" / run_id / "machine" / "out"
    script_group = Ledger().machine_for_run(run_id)["meta"]["pid"]  # run.sh, the launcher, torchrun
    cli.kill()  # no handler runs: each rank's watchdog sees the launcher gone, and they stop together
    cli.wait()
    deadline = time.time() + 60
    while ranks_alive(out) or process_group_alive(script_group):
        assert time.time() < deadline, "ranks outlived the CLI that started them"
        time.sleep(0.2)
    log = (out.parent / "train.log").read_text()
    assert "is gone; stopping with a checkpoint" in log and "stopped by SIGTERM after step" in log
    assert (out.parent / "exit_code").read_text().strip() == "143"


def test_a_rank_that_never_joins_fails_the_preflight_with_the_cause(tmp_path, reference):
    """A real failure, not a simulated one: rank 0 of 2 is started alone, without torchrun."""
    _one, two, _expected = reference
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "CLOUDTUNE_PREFLIGHT_TIMEOUT_S": "2"}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "cloudtune.train", str(two), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT_S - 10)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the training processes could not all meet within 2s" in done.stderr
    assert "Traceback" not in done.stderr
    # The 2 s are the preflight's; the rest is starting Python and torch on a busy 2-core machine. Without
    # the bound it would wait PREFLIGHT_TIMEOUT_S (180 s).
    assert time.time() - t0 < PREFLIGHT_TIMEOUT_S - 10
