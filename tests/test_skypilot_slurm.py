"""The SkyPilot backend on the REAL SkyPilot client, API server, provisioner and job runtime: SkyPilot's
Slurm cloud over a one-node Slurm on 127.0.0.1 (tests/slurm_cluster.py, started once a session).

Every test drives `cloudtune` as a user runs it, in a subprocess with a HOME of the session's own (its
own SkyPilot API server and port, never the real ~/.sky). The node has no GPU; it advertises two T4s
(Slurm GRES on /dev/null and /dev/zero), so the task asks for GPUs as on a real cluster and the training
falls back to the CPU: the end-to-end run asks for both, so its two ranks start under torchrun from
SkyPilot's node variables, as on a multi-GPU node (or the first node of several). Only one SkyPilot
cluster lives on the node at a time (a second stops the first's skylet), so the tests run one after
another and each ends with its cluster gone.

Three launches: the end-to-end run (its log stream's request cancelled on the API server while the job
runs, and reattached; a forwarded secret), a CLI killed mid-training and Ctrl-C while provisioning; about
3 1/4 minutes on 2 idle cores with the cluster's start (191, 195 and 239 s for this file alone on
2026-12-03: the cluster and SkyPilot's check 14-18 s, the end-to-end run 72-102 s, 5-6.5 s of it the
training held for the drop and reattach, the killed CLI 72-88 s, Ctrl-C 9-12 s; a launch varies by 10-20 s
from one run to the next). The same day, the version that stopped the API server under the stream took
185 and 198 s (its end-to-end run 75-84 s): the server's restart cost 4-8 s there, not 30, and in both
runs the job had ended before the stream dropped, so nothing was reattached. Most of a launch is SkyPilot's own:
provisioning 27-41 s (Slurm allocates in 0.1 s; SkyPilot's runtime venv takes 10 s, its skylet 8-14 s),
the job's start 6-9 s and 9 s more to its first line, teardown 8-17 s.
`make test` runs them; `make test-slurm` runs this file alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cloudtune.ledger import Ledger

from .conftest import REPO, demo_recipe_text, module_home, write_recipe
from .slurm_cluster import NODE_USER, SLURM_NAME

# The first launch of a session runs inside the module's fixture, which pytest-timeout counts too, and a
# loaded machine takes its time over it (13 minutes seen beside other work).
pytestmark = pytest.mark.timeout(2400)

SECRET = "hf_" + "SlurmForwardedToken" * 2
STEPS = 20
# The stand-in installs the fixture made before any run (hard links to this machine's Pythons): nothing
# a run writes lands there, and reading them all would take long.
# From `cloudtune run` to the first training step: about 2 minutes on 2 idle cores, 10 when they are shared.
LAUNCH_SECONDS = 1200
STAND_INS = ("python3.10", "uv", "trainer-venv", "trainer-site-packages")
JOB_STARTED = "Job started. Streaming logs..."  # SkyPilot's line in a job's log, before the run step's own


def slurm_recipe(folder: Path, node_python: str, steps: int = STEPS, secrets: tuple[str, ...] = (),
                 gpu_count: int = 1) -> Path:
    data = yaml.safe_load(demo_recipe_text(max_steps=steps))
    data["outputs"] = {"dir": str(folder / "outputs")}
    data["compute"] = {"cloud": "slurm", "region": SLURM_NAME, "gpu": "T4", "gpu_count": gpu_count,
                       "python": node_python, "autostop_minutes": 20}
    if secrets:
        data["secrets"] = list(secrets)
    return write_recipe(folder, yaml.safe_dump(data))


def cloudtune(sky, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune.cli", *args], env=env or sky.env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=timeout, cwd=sky.home)


def start_cloudtune(sky, log: Path, *args: str, env: dict) -> subprocess.Popen:
    """The CLI in its own session; stderr (the progress and the training's log) to `log`, stdout beside it."""
    return subprocess.Popen([sys.executable, "-m", "cloudtune.cli", *args], env=env, cwd=sky.home,
                            stdout=log.with_suffix(".out").open("w"), stderr=log.open("w"), start_new_session=True)


def wait_for(what: str, ready, seconds: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + seconds
    while not ready():
        if time.time() > deadline or (process is not None and process.poll() is not None):
            raise AssertionError(f"{what} did not happen in {seconds:.0f} s:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.25)  # a file read or one squeue: cheap, and each second waited here is the suite's


class TrainingWatcher:
    """Reads the environment and command line of the node user's training process while it runs, as
    root can: the secret must reach the training, and never through a command line. While `freeze` is
    set, it holds each rank of the training with SIGSTOP as it appears (torchrun goes on starting, and
    waits for them); `thaw` lets them go on: the job stays RUNNING, with its steps still to come, for as
    long as the test needs."""

    def __init__(self):
        self.seen_secret = False
        self.trainer_env_names: set[str] = set()  # what the training's environment held, for a failure to show
        self.streamed_live = False  # the first training step was printed while the CLI still ran
        self.command_lines: list[str] = []
        self.stop = threading.Event()
        self.freeze = threading.Event()
        self.frozen: set[int] = set()
        self.held_at = 0.0  # when the first rank was held
        self._lock = threading.Lock()

    def watch(self) -> None:
        while not self.stop.is_set():
            # -ww: whole command lines (ps cuts them at the terminal width, COLUMNS, even into a pipe)
            done = subprocess.run(["ps", "-ww", "-u", NODE_USER, "-o", "pid=,args="], capture_output=True, text=True)
            for line in done.stdout.splitlines():
                pid, _, args = line.strip().partition(" ")
                self.command_lines.append(args)
                if "cloudtune.train" in args:
                    if "torch.distributed.run" not in args:
                        self._hold(int(pid))
                    try:
                        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    self.seen_secret |= f"HF_TOKEN={SECRET}".encode() in environ
                    self.trainer_env_names |= {item.partition(b"=")[0].decode(errors="replace") for item in environ}
            time.sleep(0.25 if self.freeze.is_set() else 0.5)  # a rank is held long before it trains

    def _hold(self, pid: int) -> None:
        with self._lock:
            if self.freeze.is_set() and pid not in self.frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    self.held_at = self.held_at or time.time()
                    self.frozen.add(pid)

    def thaw(self) -> None:
        with self._lock:
            self.freeze.clear()
            for pid in self.frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def allocation_released(sky) -> None:
    """Slurm lists no job of the node user: a cancelled allocation passes through COMPLETING for as long
    as its processes take to end, so this waits a little before it fails."""
    deadline = time.time() + 90
    while sky.cluster.jobs() and time.time() < deadline:
        time.sleep(0.5)
    assert sky.cluster.jobs() == []


def files_holding(value: str, *folders: Path) -> list[Path]:
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not (Path(root) == folder and d in STAND_INS)]
            for name in files:
                path = Path(root, name)
                if path.is_file() and not path.is_symlink() and value.encode() in path.read_bytes():
                    found.append(path)
    return found


# ------------------------------------------------------------------------------------------------
# What needs no cluster: the plan, the task, the recipe's checks


def test_slurm_costs_nothing_and_the_plan_still_says_how_long_on_each_gpu(tmp_path):
    from click.testing import CliRunner

    from cloudtune.cli import cli

    data = yaml.safe_load(slurm_recipe(tmp_path, "python3").read_text())
    del data["compute"]["gpu"]  # every GPU cloudtune knows, as the cluster's may be any of them
    recipe = write_recipe(tmp_path, yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["cost", "--json", "--top", "500", str(recipe)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert "slurm: your own cluster, $0" in plan["catalog"]["prices"]
    fitting = [e for e in plan["estimates"] if e["fits"]]
    assert len({e["offer"]["gpu"] for e in fitting}) > 10
    assert all(e["offer"]["cloud"] == "slurm" and e["cost_usd_high"] == 0 for e in fitting)
    assert all(0 < e["hours_low"] <= e["hours_high"] for e in fitting)
    assert [e["hours_high"] for e in fitting] == sorted(e["hours_high"] for e in fitting)  # at $0, fastest first


def test_a_slurm_task_runs_no_image_and_trains_with_the_clusters_python(tmp_path, ct_home):
    """SkyPilot cannot run an image_id on Slurm without Pyxis: the task has none, and names the Python."""
    recipe = slurm_recipe(tmp_path, "/shared/env/bin/python3.11")
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}  # sky reads this HOME, never ~/.sky
    done = subprocess.run([sys.executable, "-m", "cloudtune.cli", "run", "--backend", "skypilot", "--dry-run", "--json",
                           str(recipe)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)["task"]
    assert "image_id" not in task["resources"]
    assert task["resources"]["ordered"] == [{"infra": f"slurm/{SLURM_NAME}", "accelerators": {"T4": 1}}]
    assert task["envs"]["CLOUDTUNE_PYTHON"] == "/shared/env/bin/python3.11" and "CLOUDTUNE_IMAGE" not in task["envs"]


@pytest.mark.parametrize(("compute", "message"), [
    ({"cloud": ["slurm", "aws"]}, "compute.cloud: slurm trains on your cluster's own Python"),
    ({"cloud": "slurm", "python": "python3; rm -rf ~"}, "compute.python: a command"),
    ({"cloud": "slurm", "spot": True}, "no offer in the price catalog matches any GPU spot on slurm"),
])
def test_slurm_recipes_are_refused_for_what_slurm_cannot_do(tmp_path, compute, message):
    from click.testing import CliRunner

    from cloudtune.cli import cli

    data = yaml.safe_load(demo_recipe_text())
    data["compute"] = compute
    result = CliRunner().invoke(cli, ["cost", str(write_recipe(tmp_path, yaml.safe_dump(data)))])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


# ------------------------------------------------------------------------------------------------
# On the localhost Slurm, through the real SkyPilot


@dataclass
class SlurmRun:
    """One `cloudtune run` on the localhost Slurm with a forwarded secret, made once and read by two tests."""

    folder: Path
    ct_home: Path
    returncode: int
    stderr: str
    stdout: str
    watcher: TrainingWatcher


@pytest.fixture(scope="module")
def slurm_run(slurm_sky, tmp_path_factory, shared_home) -> SlurmRun:
    folder = tmp_path_factory.mktemp("slurm-run")
    with module_home(shared_home, tmp_path_factory) as ct_home, \
            slurm_sky.request_canceller("sky.logs") as cancel_log_streams:
        recipe = slurm_recipe(folder, slurm_sky.cluster.node_python, secrets=("HF_TOKEN",), gpu_count=2)
        env = slurm_sky.env(PYTHONPATH=str(REPO), CLOUDTUNE_HOME=str(ct_home), HF_TOKEN=SECRET)
        log = folder / "cli.log"
        watcher = TrainingWatcher()
        watcher.freeze.set()  # the training is held as it starts, until its log stream has been dropped
        thread = threading.Thread(target=watcher.watch, daemon=True)
        thread.start()
        started = time.time()
        cli = start_cloudtune(slurm_sky, log, "run", "--backend", "skypilot", "--json", str(recipe), env=env)

        def shown() -> str:
            return " ".join(log.read_text().split())  # as the terminal wrapped it

        try:
            wait_for("the training starting on the node", lambda: watcher.frozen, LAUNCH_SECONDS, cli, log)
            wait_for("the job's log streaming to the CLI", lambda: JOB_STARTED in shown(), 120, cli, log)
            # A dropped log stream: its request is cancelled on the API server, which keeps running (as
            # another user of a shared server, or `sky api cancel`, does) and ends the stream. The job is
            # RUNNING, all its steps to come: its ranks are held as they start (their 20 steps take 1-3 s,
            # less than a drop and a reattach: 5-6.5 s from the cancel to the CLI's reattach, most of it the
            # server noticing and the CLI's job_status). The CLI must reattach and go on. (`sky api stop`
            # here instead cost the server's restart, 4-8 s, and came after the job had ended.)
            held = time.time()
            cancelled = cancel_log_streams()
            assert len(cancelled) == 1, cancelled
            dropped = f"log stream dropped (ConnectionError: SkyPilot's API server cancelled the log request " \
                      f"{cancelled[0]}) while the job is RUNNING: reattaching"
            cancel_seconds = time.time() - held
            wait_for("the CLI reattaching its log stream", lambda: dropped in shown(), 120, cli, log)
            watcher.thaw()
            print(f"log stream cancelled in {cancel_seconds:.1f} s and reattached {time.time() - held:.1f} s after "
                  f"the cancel began; {len(watcher.frozen)} ranks held for {time.time() - watcher.held_at:.1f} s")
            # the log streams while the training runs, not only once it has ended
            wait_for("a training step in the CLI's output", lambda: f"step 1/{STEPS}" in log.read_text(), 300, cli,
                     log)
            watcher.streamed_live = cli.poll() is None
            cli.wait(timeout=900)
        finally:
            watcher.thaw()
            watcher.stop.set()
            thread.join()
            if cli.poll() is None:
                cli.kill()
        print(f"cloudtune run on Slurm took {time.time() - started:.0f} s")
        yield SlurmRun(folder, ct_home, cli.returncode, log.read_text(), log.with_suffix(".out").read_text(), watcher)


def test_a_run_on_slurm_trains_pulls_verifies_and_tears_down(slurm_sky, slurm_run):
    """Provision, upload, setup (the wheel beside the cluster's Python), training on the node's two GPUs
    (two DDP ranks, torchrun started from SkyPilot's node variables) with the log streamed live and
    reattached after its request was cancelled on SkyPilot's API server, pull with checksums, outputs
    that reload, `sky down`, and the ledger's `terminated` once SkyPilot lists no cluster and Slurm no
    allocation."""
    assert slurm_run.returncode == 0, slurm_run.stderr[-6000:]
    assert slurm_run.watcher.streamed_live
    log = " ".join(slurm_run.stderr.split())  # as the terminal wrapped it
    assert log.count("cancelled the log request") == 1  # the reattach the fixture waited for
    assert log.count(JOB_STARTED) == 1  # shown before the drop; the reattached stream skipped it
    assert "'sky.logs' request" not in log  # the API server's last line on that stream was not shown as the job's
    receipt = json.loads(slurm_run.stdout)  # SkyPilot's own printing stayed off stdout
    assert receipt["backend"] == "skypilot" and receipt["steps"] == STEPS
    for step in range(1, STEPS + 1):  # once each: the reattached stream skips what was already shown
        assert slurm_run.stderr.count(f"step {step}/{STEPS} ") == 1, step

    out = Path(receipt["output_dir"])
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["nodes"], run["parallelism"]) == (2, 1, "ddp"), run
    assert "ddp over 2 ranks" in " ".join(slurm_run.stderr.split())  # the log's line, as the terminal wrapped it
    # The reload runs on this machine alone while SkyPilot and Slurm are asked what is left: side by side
    verify = subprocess.Popen([sys.executable, "-m", "cloudtune.train.verify", str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        machine = Ledger(slurm_run.ct_home / "ledger.db").machine_for_run(receipt["run_id"])
        assert machine["status"] == "terminated"
        assert machine["name"] not in slurm_sky.clusters()
        allocation_released(slurm_sky)
        output, _ = verify.communicate(timeout=300)
        assert verify.returncode == 0, output
    finally:
        if verify.poll() is None:
            verify.kill()


def test_a_forwarded_secret_reaches_the_training_and_is_stored_nowhere(slurm_sky, slurm_run):
    """The secret reaches the training process, and is in no `ps` line, no output, and no file of
    CLOUDTUNE_HOME, the SkyPilot client's HOME (state database, request logs, generated task files) or
    the Slurm side (node home, spool, runtime folder)."""
    assert slurm_run.returncode == 0, slurm_run.stderr[-6000:]
    seen = sorted({line for line in slurm_run.watcher.command_lines if "cloudtune" in line})[:20]
    assert slurm_run.watcher.seen_secret, ("the secret did not reach the training process; its environment held "
                                           f"{sorted(slurm_run.watcher.trainer_env_names)}; processes seen: {seen}")
    assert SECRET not in slurm_run.stdout + slurm_run.stderr
    assert files_holding(SECRET, slurm_run.ct_home, slurm_run.folder, slurm_sky.home, slurm_sky.cluster.scratch) == []
    assert not [line for line in slurm_run.watcher.command_lines if SECRET in line], "the secret showed in `ps`"


def test_a_killed_cli_leaves_its_cluster_set_to_tear_itself_down_and_down_removes_it(slurm_sky, tmp_path,
                                                                                      ct_home):
    """A CLI killed with SIGKILL mid-training runs no handler: the cluster stays up (cloud runs outlive
    their CLI), with autodown armed in SkyPilot's own record of it, and `cloudtune down` finds it and
    removes it; the ledger says terminated once SkyPilot and Slurm have nothing left."""
    recipe = slurm_recipe(tmp_path, slurm_sky.cluster.node_python, steps=2000)  # still training when killed
    env = slurm_sky.env(PYTHONPATH=str(REPO), CLOUDTUNE_HOME=str(ct_home))
    log = tmp_path / "cli.log"
    cli = start_cloudtune(slurm_sky, log, "run", "--backend", "skypilot", str(recipe), env=env)
    try:
        # the trainer prints step 1, then every 40th of 2000: step 1 is the first sign of training. Without
        # --json the streamed training log is the CLI's main output, on stdout.
        wait_for("training", lambda: "step 1/2000 " in log.with_suffix(".out").read_text(), LAUNCH_SECONDS, cli,
                 log.with_suffix(".out"))
    finally:
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=30)
    run = Ledger().runs(1)[0]
    name = Ledger().machine_for_run(run["id"])["name"]
    removed = False
    try:
        record = slurm_sky.record(name)
        assert record["status"] == "UP" and record["to_down"] is True and record["autostop"] == 20, record

        down = cloudtune(slurm_sky, "down", "--yes", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert name in down.stdout + down.stderr
        assert name not in slurm_sky.clusters()
        removed = True
        allocation_released(slurm_sky)
        assert Ledger().machine_for_run(run["id"])["status"] == "terminated"
    finally:
        if not removed:  # the next test needs the node to itself
            slurm_sky.sky("down", "--yes", name, timeout=600)


def test_ctrl_c_while_provisioning_leaves_no_allocation_and_no_cluster(slurm_sky, tmp_path, ct_home):
    """Ctrl-C while SkyPilot provisions: once the CLI has exited, Slurm holds no allocation for it and
    SkyPilot lists no cluster."""
    recipe = slurm_recipe(tmp_path, slurm_sky.cluster.node_python)
    env = slurm_sky.env(PYTHONPATH=str(REPO), CLOUDTUNE_HOME=str(ct_home))
    log = tmp_path / "cli.log"
    cli = start_cloudtune(slurm_sky, log, "run", "--backend", "skypilot", str(recipe), env=env)
    try:  # the tests run one at a time, each ending with no allocation: any job of the node user is this run's
        wait_for("a Slurm allocation", lambda: bool(slurm_sky.cluster.jobs()), LAUNCH_SECONDS, cli, log)
    finally:
        cli.send_signal(signal.SIGINT)
    cli.wait(timeout=300)
    assert cli.returncode != 0, log.read_text()[-4000:]
    run = Ledger().runs(1)[0]
    assert run["status"] == "cancelled", run
    name = Ledger().machine_for_run(run["id"])["name"]
    allocation_released(slurm_sky)
    assert name not in slurm_sky.clusters()
