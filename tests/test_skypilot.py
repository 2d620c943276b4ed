"""The SkyPilot backend, offline: SkyPilot's own loader, schema, catalog and optimizer judge the tasks,
and a fake cloud (tests/fake_sky.py) stands in for the SDK calls that would reach a cloud.

SkyPilot reads ~/.sky when imported, so this module points HOME at a directory of its own before
anything imports sky; SkyPilot has no catalog there, so it reads the bundled snapshot (through
cloudtune's view, planning/sky_catalog.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cloudtune.backends.base import Quote
from cloudtune.backends.capabilities import SpansMachines
from cloudtune.backends.skypilot import (
    SKYPILOT_VERSION,
    SkyPilotBackend,
    check_image,
    disk_size_gib,
    task_config,
    to_task,
    to_yaml,
)
from cloudtune.errors import CloudtuneError, PullFailed, RunFailed
from cloudtune.events import Events
from cloudtune.ledger import Ledger
from cloudtune.lifecycle import Machine, context_for, find_machines, pull_again, tear_down
from cloudtune.lifecycle import run as execute
from cloudtune.recipe import DEFAULT_IMAGE, load_recipe
from cloudtune.remote.watchdog import process_alive as pid_alive

from .conftest import REPO, demo_recipe_text, write_recipe
from .fake_sky import JOBS_CONTROLLER, FakeCloud, a10_plan, down_every_cluster, make_image

SECRET = "hf_" + "Sk7pilotSecretValue" * 2
DISK_GIB = {"llama2-7b-qlora-guanaco": 70, "llama2-7b-lora-r8": 80, "llama2-7b-full": 160}


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def no_cluster_outlives_its_test():
    yield
    down_every_cluster()


@pytest.fixture(scope="module", autouse=True)
def sky_home(tmp_path_factory):
    """A HOME of its own for SkyPilot, with no catalog of SkyPilot's: it prices and validates from the
    bundled snapshot, as on a laptop SkyPilot has never fetched one on."""
    home = tmp_path_factory.mktemp("sky-home")
    saved = {key: os.environ.get(key) for key in ("HOME", "SKY_RUNTIME_DIR")}
    os.environ["HOME"] = str(home)
    os.environ.pop("SKY_RUNTIME_DIR", None)
    from sky.catalog import common

    real_home = pwd.getpwuid(os.getuid()).pw_dir
    assert not common._ABSOLUTE_VERSIONED_CATALOG_DIR.startswith(real_home + "/"), \
        "sky was imported under the real HOME before this module; its state must stay out of ~/.sky"
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("fake-image"))


@pytest.fixture
def cloud(tmp_path, image) -> FakeCloud:
    return FakeCloud(tmp_path / "fake-cloud", image)


class Recorder(Events):
    def __init__(self):
        self.phases, self.lines, self.warnings = [], [], []

    def phase(self, name, detail=""):
        self.phases.append(name)

    def log(self, line):
        self.lines.append(line)

    def warn(self, message):
        self.warnings.append(message)


class Registry(BaseHTTPRequestHandler):
    """An image registry on 127.0.0.1 speaking the part of the v2 API a digest lookup uses, token auth included."""

    digest = "sha256:" + hashlib.sha256(b"cloudtune test image").hexdigest()

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/token?") and "scope=repository%3Acloudtune%2Ftrain%3Apull" in self.path:
            self._reply(200, {"Content-Type": "application/json"}, json.dumps({"token": "t0k"}).encode())
        else:
            self._reply(404)

    def do_HEAD(self):  # noqa: N802
        if self.path != "/v2/cloudtune/train/manifests/1.0":
            self._reply(404)
        elif self.headers.get("Authorization") != "Bearer t0k":
            realm = f"http://127.0.0.1:{self.server.server_port}/token"
            self._reply(401, {"WWW-Authenticate":
                              f'Bearer realm="{realm}",service="test",scope="repository:cloudtune/train:pull"'})
        elif "application/vnd.oci.image.index.v1+json" not in self.headers.get("Accept", ""):
            self._reply(406)
        else:
            self._reply(200, {"Docker-Content-Digest": self.digest})

    def _reply(self, code, headers=None, body=b""):
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def registry():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


# Pinned by digest, so the machine's digest lookup needs no registry (tests never reach a network).
PINNED_IMAGE = "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime@sha256:" + "ab" * 32


def tiny_recipe(tmp_path: Path, *, steps: int = 8, image: str = PINNED_IMAGE, extra: str = ""):
    text = demo_recipe_text(max_steps=steps)
    text += f"compute:\n  image: {image}\n  autostop_minutes: 20\n"
    return load_recipe(write_recipe(tmp_path, text + extra))


def no_secret_anywhere(*roots: Path) -> None:
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), f"secret value found in {path}"


# ----------------------------------------------------------------------------------------------
# The generated task, as SkyPilot itself reads it


SEEDS = ("llama2-7b-qlora-guanaco", "llama2-7b-lora-r8", "llama2-7b-full")


@pytest.fixture(scope="module")
def seed_plans(sky_home, tmp_path_factory) -> dict:
    """cloudtune's own plans (cost model, bundled prices) for the seed recipes, with and without --gpu."""
    from cloudtune.datasets import inspect_dataset
    from cloudtune.planning.planner import make_plan

    plans = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLOUDTUNE_HOME", str(tmp_path_factory.mktemp("plans-home")))
        for seed in SEEDS:
            recipe = load_recipe(REPO / "tasks" / f"{seed}.yaml")
            report = inspect_dataset(recipe)
            for gpu in (None, "H100"):
                for spot in (False, True):
                    plans[seed, gpu, spot] = make_plan(recipe, report, gpu=gpu, spot=spot)
    return plans


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("spot", [False, True])
@pytest.mark.parametrize("gpu", [None, "H100"])
def test_task_loads_in_skypilot(seed, spot, gpu, seed_plans):
    recipe = load_recipe(REPO / "tasks" / f"{seed}.yaml")
    recipe.compute.spot = spot
    plan = seed_plans[seed, gpu, spot]
    backend = SkyPilotBackend(plan=plan)
    backend.model_bytes = 13.5e9
    shown = backend.dry_run(Quote(summary="", recipe=recipe))
    config = copy.deepcopy(shown["task"])
    config["secrets"] = {"HF_TOKEN": SECRET}

    # Both of SkyPilot's checks: the schema (top-level keys) and the loader (everything inside).
    from sky.utils import common_utils, schemas

    common_utils.validate_schema(config, schemas.get_task_schema(), "Invalid task YAML: ")
    task = to_task(config)
    resources = list(task.resources)
    assert [(str(r.cloud).lower(), r.instance_type) for r in resources] == \
           [(e.offer.cloud, e.offer.instance_type) for e in plan.candidates()]
    if gpu:
        assert all(next(iter(r.accelerators)).startswith("H100") for r in resources)
    assert all(r.use_spot == spot for r in resources)
    assert all(str(r.image_id[None]) == f"docker:{DEFAULT_IMAGE}" for r in resources)
    assert task.num_nodes == 1 and "-u -m cloudtune.remote.launch bundle/recipe.yaml --out out" in task.run
    assert task.secrets["HF_TOKEN"].get_secret_value() == SECRET and "HF_TOKEN" not in task.envs
    if spot:
        assert all(r.job_recovery["max_restarts_on_errors"] == 0 for r in resources)
        assert task.storage_mounts["~/cloudtune/out"].mode.value == "MOUNT_CACHED"
        assert shown["managed_job"] and shown["notes"]  # no checkpoint_steps in the seeds: a preemption restarts
    else:
        assert all(r.autostop_config.enabled and r.autostop_config.down for r in resources)
        assert {r.autostop_config.idle_minutes for r in resources} == {recipe.compute.autostop_minutes}
    # 13.5 GB of weights on 40 GiB of image and packages: +1 copy for a merge, +7 for a full fine-tune's outputs.
    assert {r.disk_size for r in resources} == {DISK_GIB[seed]}
    assert SECRET not in shown["yaml"] and "HF_TOKEN: <redacted>" in shown["yaml"]
    assert yaml.safe_load(shown["yaml"])["resources"] == config["resources"]


def test_skypilot_names_the_typo_in_a_task():
    config = task_config("ct-x", {"ordered": [{"infra": "aws", "acelerators": {"A10G": 1}}]})
    with pytest.raises(CloudtuneError, match="did you mean 'accelerators'"):
        to_task(config)


class TaskRecorder:
    """A SkyClient that keeps the tasks it is handed and starts nothing: what provision and start ask of
    SkyPilot, as SkyPilot's own loader read them."""

    def __init__(self):
        self.tasks = []

    def enabled_clouds(self) -> list[str]:
        return ["aws", "lambda"]

    def launch(self, task, cluster: str, *, autostop_minutes: int) -> str:
        self.tasks.append(task)
        return "request-1"

    def wait_launched(self, request_id: str) -> dict:
        return {"cloud": "lambda", "region": "us-east-1", "zone": None, "instance_type": "gpu_1x_a10",
                "accelerators": {"A10": 1}, "spot": False, "price_per_hour": 1.29}

    def exec(self, task, cluster: str) -> int:
        self.tasks.append(task)
        return 1


def test_several_machines_reach_skypilot_as_num_nodes(tmp_path):
    recipe = tiny_recipe(tmp_path, extra="  num_nodes: 2\n")
    recorder = TaskRecorder()
    backend = SkyPilotBackend(client=recorder, plan=a10_plan())
    assert isinstance(backend, SpansMachines)
    shown = backend.dry_run(Quote(summary="", recipe=recipe))
    assert shown["task"]["num_nodes"] == 2 and "num_nodes: 2" in shown["yaml"]
    assert to_task(shown["task"]).num_nodes == 2  # sky.Task.from_yaml_config, after SkyPilot's schema check
    ctx = context_for(backend, Machine(name="ct-x", run_id="x", backend="skypilot", status="requested"), recipe)
    backend.provision(ctx)
    backend.start(ctx)
    assert [task.num_nodes for task in recorder.tasks] == [2, 2]  # the cluster's machines, and the run on each
    one = tiny_recipe(tmp_path)
    assert to_task(SkyPilotBackend(plan=a10_plan()).dry_run(Quote(summary="", recipe=one))["task"]).num_nodes == 1


def test_optimizer_picks_the_plans_cheapest_offer_offline(tmp_path):
    """SkyPilot's optimizer, on the snapshot's prices, lands on the offer the plan put first.

    The plan ranks by dollars per run: Lambda's A10 first although AWS's A10G and L4 cost less per
    hour, so SkyPilot must honour the order rather than rank by $/h itself.
    """
    import sky
    import sky.catalog
    from sky import check, global_user_state, optimizer
    from sky.clouds import cloud as cloud_lib
    from sky.utils import common

    from cloudtune.planning.sky_catalog import use_catalog_view

    use_catalog_view()  # what cloudtune does before sky reads a catalog: this HOME has none of SkyPilot's
    offers = {}
    for name, clouds in (("A10", "lambda"), ("A10G", "aws"), ("L4", "aws")):
        for info in sky.catalog.list_accelerators(gpus_only=True, name_filter=f"^{name}$", clouds=clouds)[name]:
            if info.accelerator_count == 1:
                offers[name] = info
    plan = a10_plan()
    for estimate in plan.candidates():  # the plan's prices are SkyPilot's catalog prices
        info = offers[estimate.offer.gpu]
        assert (info.instance_type, info.region, info.price) == \
               (estimate.offer.instance_type, estimate.offer.region, estimate.offer.price_per_hour)

    workspace = "default"
    global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(workspace), workspace)
    global_user_state.set_enabled_clouds(["AWS", "Lambda"], cloud_lib.CloudCapability.COMPUTE, workspace)
    backend = SkyPilotBackend(client=FakeCloud(tmp_path, tmp_path), plan=plan)
    recipe = tiny_recipe(tmp_path)
    from cloudtune.backends.skypilot import resources_config

    for candidates in (plan.candidates(), plan.candidates()[1:]):
        resources = resources_config(candidates, recipe.compute, 64, managed=False)
        task = to_task(task_config("ct-optimize", resources))
        with sky.Dag() as dag:
            dag.add(task)
        optimizer.Optimizer.optimize(dag, minimize=common.OptimizeTarget.COST, quiet=True)
        best, first = task.best_resources, candidates[0].offer
        assert (str(best.cloud).lower(), best.instance_type, best.region) == \
               (first.cloud, first.instance_type, first.region)
        assert best.get_cost(3600) == pytest.approx(first.price_per_hour)
    assert backend.usable_candidates() == plan.candidates()


# ----------------------------------------------------------------------------------------------
# The lifecycle on the fake cloud


def test_run_provisions_syncs_trains_pulls_and_tears_down(tmp_path, cloud, registry, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    recipe = tiny_recipe(tmp_path, steps=12, image=f"{registry}/cloudtune/train:1.0", extra="secrets: [HF_TOKEN]\n")
    events = Recorder()
    result = execute(recipe, SkyPilotBackend(client=cloud, plan=a10_plan()), events)

    assert result.status == "succeeded"
    assert events.phases == ["data", "plan", "run", "provision", "sync", "train", "pull", "teardown"]
    assert any("step 12/12" in line for line in events.lines)
    out = Path(result.receipt["output_dir"])
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "run.json", "manifest.json", "receipt.json"):
        assert (out / name).is_file(), name
    run_json = json.loads((out / "run.json").read_text())
    # Recorded by the machine itself, from the registry, after the image was "pulled".
    assert run_json["image_digest"] == f"{registry}/cloudtune/train@{Registry.digest}"

    calls = cloud.calls()
    assert [c["call"] for c in calls] == ["launch", "exec", "down"]
    provision, start, _ = calls
    assert provision["resources"][0].startswith("Lambda(gpu_1x_a10") and len(provision["resources"]) == 3
    assert provision["autostop_minutes"] == 20 and not provision["file_mounts"] and not provision["has_run"]
    assert not provision["workdir"]
    # One exec carries the upload (as its workdir, which SkyPilot syncs to every node) and runs the setup
    # inside the training's job: no second launch, no setup job of its own.
    assert start["workdir"].endswith("/upload") and not start["has_setup"]
    # The secret went up in the upload as a file only its owner reads, never as task envs or secrets,
    # which SkyPilot writes into its job script (Slurm: its executor's command line).
    assert start["secrets_file_mode"] == "0o600" and not start["secrets"] and "HF_TOKEN" not in start["envs"]
    assert cloud.status() == {}, "cluster left behind"

    ledger = Ledger()
    run = ledger.get_run(result.run_id)
    machine = ledger.machine_for_run(result.run_id)
    assert run["status"] == "succeeded" and machine["status"] == "terminated"
    assert machine["meta"]["launched"]["instance_type"] == "gpu_1x_a10"
    assert machine["meta"]["job_id"] == 1
    no_secret_anywhere(Path(os.environ["CLOUDTUNE_HOME"]), out, cloud.root / "calls.jsonl")
    # The machine trained from the wheel, not from this checkout.
    installed = list((cloud.image / "lib").glob("python3*/site-packages/cloudtune/backends/skypilot.py"))
    assert installed and installed[0].read_text() == (REPO / "cloudtune/backends/skypilot.py").read_text()
    local_log = Path(os.environ["CLOUDTUNE_HOME"]) / "runs" / result.run_id / "train.log"
    assert "step 12/12" in local_log.read_text()  # `cloudtune logs` works after the machine is gone
    assert [p.name for p in local_log.parent.iterdir()] == ["train.log"]  # no copy of the upload left behind


def test_failed_training_is_torn_down_and_the_secret_stays_redacted(tmp_path, cloud, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    # The token in the model path makes the training print it: it reached the machine, and must go nowhere else.
    text = demo_recipe_text(max_steps=2).replace("init: tiny-llama", f"name: /nonexistent/{SECRET}")
    text += f"secrets: [HF_TOKEN]\ncompute:\n  image: {PINNED_IMAGE}\n"
    recipe = load_recipe(write_recipe(tmp_path, text))
    with pytest.raises(RunFailed) as failed:
        execute(recipe, SkyPilotBackend(client=cloud, plan=a10_plan()), Recorder())
    assert "exited with status 1" in failed.value.message and "<redacted>" in failed.value.message
    assert SECRET not in str(failed.value)
    assert [c["call"] for c in cloud.calls()][-1] == "down" and cloud.status() == {}
    run = Ledger().runs(1)[0]
    assert run["status"] == "failed" and Ledger().machine_for_run(run["id"])["status"] == "terminated"
    no_secret_anywhere(Path(os.environ["CLOUDTUNE_HOME"]), cloud.root / "calls.jsonl")


class SeamCalls:
    """The fake behind a counter of the SkyClient calls the backend makes (the fake's own polling of its
    jobs, inside its log tail, is not one of them)."""

    def __init__(self, cloud: FakeCloud):
        self.cloud, self.names = cloud, []

    def __getattr__(self, name: str):
        attribute = getattr(self.cloud, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            self.names.append(name)
            return attribute(*args, **kwargs)
        return call


def test_the_log_streams_final_status_is_the_exit_status_without_asking_again(tmp_path, image, monkeypatch):
    """Each of SkyPilot's status calls costs seconds (Slurm: a refresh through the login node): the log
    streams from the cluster the run just started its job on without asking whether it is there, once the
    log has ended one job_status says how the job ended, and nothing asks again before the pull."""
    monkeypatch.chdir(tmp_path)
    seam = SeamCalls(FakeCloud(tmp_path / "fake-cloud", image))
    result = execute(tiny_recipe(tmp_path, steps=2), SkyPilotBackend(client=seam, plan=a10_plan()), Recorder())
    assert result.status == "succeeded"
    after_stream = seam.names[seam.names.index("tail_logs") + 1:seam.names.index("rsync_remote")]
    assert after_stream == ["job_status"], seam.names
    assert seam.names.count("status") == 1, seam.names  # teardown's check that the cluster is gone


def test_a_failed_setup_fails_the_run_saying_so_and_tears_down(tmp_path, image, monkeypatch):
    """The setup runs inside the training's job: a bundle that arrives changed fails its checksums, and
    the run fails naming the setup, with sha256sum's verdict in the log, before any training step."""
    monkeypatch.chdir(tmp_path)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, corrupt_upload=True)
    events = Recorder()
    with pytest.raises(RunFailed) as failed:
        execute(tiny_recipe(tmp_path, steps=2), SkyPilotBackend(client=cloud, plan=a10_plan(), events=events),
                events)
    message = failed.value.message
    assert "exited with status 1" in message and "bundle.tar.gz: FAILED" in message
    assert "the setup step failed" in message and "the training did not start" in message
    assert not any(line.startswith("step ") for line in events.lines)
    assert [c["call"] for c in cloud.calls()][-1] == "down" and cloud.status() == {}


@pytest.mark.parametrize("trouble", ["interrupt", "connection"])
def test_interrupt_or_lost_connection_while_training_tears_down(tmp_path, image, trouble, monkeypatch):
    """A connection that never comes back (every stream breaks, no new line) fails the run once the
    reattach timeout is spent, here shortened."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cloudtune.backends.skypilot.REATTACH_SECONDS", 2)
    monkeypatch.setattr("cloudtune.backends.skypilot.REATTACH_MAX_DELAY", 0.5)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, **{f"{trouble.replace('connection', 'fail')}_after_lines": 3})
    recipe = tiny_recipe(tmp_path, steps=100000)
    expected = KeyboardInterrupt if trouble == "interrupt" else RunFailed
    events = Recorder()
    with pytest.raises(expected) as raised:
        execute(recipe, SkyPilotBackend(client=cloud, plan=a10_plan(), events=events), events)
    if trouble == "connection":
        assert "could not be reattached" in raised.value.message and "RUNNING" in raised.value.message
        assert any("reattaching" in warning for warning in events.warnings)
    run = Ledger().runs(1)[0]
    assert run["status"] == ("cancelled" if trouble == "interrupt" else "failed")
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated"
    calls = [c["call"] for c in cloud.calls()]
    assert calls[-1] == "down" and ("cancel" in calls) == (trouble == "interrupt")
    assert cloud.status() == {}
    if trouble == "interrupt":  # the cancelled training checkpoints as it stops; that is kept for --resume
        assert (Path(run["meta"]["checkpoint"]) / "COMPLETE").is_file(), run["meta"]
    assert not any(pid_alive(p) for p in _training_pids(cloud)), "training outlived its cluster"


@pytest.mark.parametrize(("trouble", "recorded", "why"), [
    ({"drop_after_lines": 4}, "stream_dropped", "the stream ended"),
    ({"cancel_after_lines": 4}, "stream_cancelled",
     "ConnectionError: SkyPilot's API server cancelled the log request 0f1e2d3c-fake"),
    # SkyPilot's lines about waiting for the job's log are in the first stream only: none may be counted
    ({"drop_after_lines": 4, "log_written_late": True}, "stream_dropped", "the stream ended"),
], ids=["dropped", "cancelled", "dropped-after-waiting-for-the-log"])
def test_a_dropped_log_stream_is_reattached_and_the_run_goes_on(tmp_path, image, monkeypatch, trouble, recorded,
                                                                 why):
    """The stream ends mid-run while the job is RUNNING, quietly (a laptop that slept) or because its
    request was cancelled on the API server (`sky api cancel`, another user of a shared server): the log
    is reopened, no line is shown twice or lost, the server's line about the cancellation is not shown as
    the training's, and the run ends as the training does, not torn down halfway nor taken for Ctrl-C."""
    monkeypatch.chdir(tmp_path)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, **trouble)
    events = Recorder()
    result = execute(tiny_recipe(tmp_path, steps=6), SkyPilotBackend(client=cloud, plan=a10_plan(), events=events),
                     events)
    assert result.status == "succeeded" and result.receipt["steps"] == 6
    calls = [c["call"] for c in cloud.calls()]
    assert calls == ["launch", "exec", recorded, "down"]
    assert any(f"log stream dropped ({why}) while the job is RUNNING: reattaching" in warning
               for warning in events.warnings), events.warnings
    assert not any("cancelled" in line or "for the logs to be written" in line for line in events.lines)
    steps = [line.split()[1] for line in events.lines if line.startswith("step ")]
    assert steps == [f"{n}/6" for n in range(1, 7)]  # each once, in order, through the drop


def test_a_log_stream_the_api_server_ended_or_interrupted_raises_connection_error(monkeypatch):
    """What the real client makes of SkyPilot 0.14.1's stream: the line its API server sends before it
    closes the stream of a cancelled request is not yielded and raises ConnectionError, as a restarting
    server's retry marker (RequestInterruptedError) does; a line of the job's own that reads the same is
    kept when more follow."""
    import sky
    from sky import exceptions

    from cloudtune.backends.skypilot import SkyClient, log_stream

    cancelled = "'sky.logs' request 6c1d-ab cancelled\n"
    streams = {
        "cancelled": ["(task, pid=7) step 1/3\n", None, cancelled],
        "look-alike": [cancelled, "step 2/3\n"],
        "restart": ["step 1/3\n", exceptions.RequestInterruptedError("Streaming interrupted. Please retry.")],
    }

    def tail_logs(cluster, job_id, follow, preload_content):
        assert preload_content is False
        for item in streams[cluster]:
            if isinstance(item, Exception):
                raise item
            yield item

    monkeypatch.setattr(sky, "tail_logs", tail_logs)
    client = SkyClient()
    client.server.checked = True  # no API server to start: the stream is SkyPilot's, stood in above
    shown: list[str] = []
    with pytest.raises(ConnectionError, match="cancelled the log request 6c1d-ab$"):
        shown.extend(client.tail_logs("cancelled", 1, True))
    assert shown == ["step 1/3\n"]
    assert list(client.tail_logs("look-alike", 1, True)) == [cancelled, "step 2/3\n"]
    shown.clear()
    with pytest.raises(ConnectionError, match="Please retry"):
        shown.extend(log_stream(lambda: tail_logs("restart", 1, True, False)))
    assert shown == ["step 1/3\n"]


def test_ctrl_c_while_provisioning_cancels_the_request_and_downs_the_cluster(tmp_path, image, monkeypatch):
    """Ctrl-C while SkyPilot provisions (the cluster is INIT, with no autostop armed yet): the launch
    request is cancelled on the API server, the cluster downed, exit 130 without a traceback."""
    from click.testing import CliRunner

    from cloudtune.cli import cli

    monkeypatch.chdir(tmp_path)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, interrupt_launch=True)
    monkeypatch.setattr("cloudtune.backends.skypilot.SkyClient", lambda *args, **kwargs: cloud)
    monkeypatch.setattr("cloudtune.planning.planner.make_plan", lambda *args, **kwargs: a10_plan())
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=4) + f"compute:\n  image: {PINNED_IMAGE}\n")
    result = CliRunner().invoke(cli, ["run", "--backend", "skypilot", str(recipe)])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "interrupted" in result.output
    assert "provisions ct-" in result.output and "cancelling its request" in " ".join(result.output.split())
    assert [c["call"] for c in cloud.calls()] == ["launch", "cancel_request", "down"]
    assert cloud.calls()[1]["request"] == "request-1" and cloud.status() == {}
    run = Ledger().runs(1)[0]
    assert run["status"] == "cancelled" and Ledger().machine_for_run(run["id"])["status"] == "terminated"


def _training_pids(cloud: FakeCloud) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if f"HOME={cloud.root}".encode() in environ:
                found.append(int(proc.name))
    return found


def test_failed_pull_leaves_the_machine_up_and_pull_retries(tmp_path, image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, corrupt_on_pull=True)
    events = Recorder()
    with pytest.raises(PullFailed) as failed:
        execute(tiny_recipe(tmp_path, steps=4), SkyPilotBackend(client=cloud, plan=a10_plan()), events)
    run = Ledger().runs(1)[0]
    assert "checksum mismatch" in failed.value.message and f"cloudtune pull {run['id']}" in failed.value.hint
    assert any(f"cloudtune pull {run['id']}" in w and f"cloudtune down {run['id']}" in w for w in events.warnings)
    assert "down" not in [c["call"] for c in cloud.calls()] and f"ct-{run['id']}" in cloud.status()
    machine = Ledger().machine_for_run(run["id"])
    assert machine["status"] == "up" and machine["meta"]["pull_failed"] is True
    assert run["status"] == "failed" and "did not come back" in run["error"]
    assert not Path(run["output_dir"]).exists()

    cloud.corrupt_on_pull = False
    result = pull_again(run["id"], Recorder(), backend_for=lambda name: SkyPilotBackend(client=cloud))
    assert (Path(run["output_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert result.receipt["steps"] == 4
    assert Ledger().get_run(run["id"])["status"] == "succeeded"
    assert Ledger().machine_for_run(run["id"])["status"] == "terminated" and cloud.status() == {}


def test_down_all_finds_the_cluster_of_a_killed_cli(tmp_path, image, sky_home):
    cloud = FakeCloud(tmp_path / "fake-cloud", image)
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=100000) + f"compute:\n  image: {PINNED_IMAGE}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(sky_home)}
    cli = subprocess.Popen([sys.executable, "-m", "tests.fake_sky", str(recipe), str(cloud.root), str(image)],
                           cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (Ledger().runs(1) and Ledger().runs(1)[0]["status"] == "running"):
        assert cli.poll() is None, cli.stderr.read().decode()
        time.sleep(0.2)
    run = Ledger().runs(1)[0]
    cli.send_signal(signal.SIGKILL)  # no finally, no teardown: only the ledger and the cloud remember
    cli.wait()
    assert _training_pids(cloud), "the training should still be running on its machine"

    # `cloudtune logs RUN` from another terminal: the job's log, from the ledger's record of the run.
    reattached = SkyPilotBackend(client=cloud)
    deadline = time.time() + 180  # a loaded machine takes its time to load the model
    while not any("step 1/" in line for line in reattached.logs(
            context_for(reattached, Machine.from_row(Ledger().machine_for_run(run["id"]))), False)):
        assert time.time() < deadline, "no training log through a reattached backend"
        time.sleep(0.5)

    # A second cluster the ledger never saw (a ledger from another machine, say): SkyPilot's list finds it.
    orphan = "ct-20260101-000000-beef"
    cloud.wait_launched(cloud.launch(to_task(task_config(orphan, {"infra": "aws", "instance_type": "g5.xlarge"})),
                                     orphan, autostop_minutes=5))
    backends = {"skypilot": SkyPilotBackend(client=cloud)}
    machines = find_machines(None, backend_for=backends.__getitem__)
    assert {m.name for m in machines} == {f"ct-{run['id']}", orphan}
    results = {r.machine: r.verified for r in tear_down(machines, Recorder(), backend_for=backends.__getitem__)}
    assert results == {f"ct-{run['id']}": True, orphan: True}
    assert cloud.status() == {} and not _training_pids(cloud)
    assert Ledger().get_run(run["id"])["status"] == "cancelled"
    assert find_machines(None, backend_for=backends.__getitem__) == []


def test_missing_credentials_name_cloudtune_check_and_the_enabled_clouds(tmp_path, image):
    recipe = tiny_recipe(tmp_path)
    for enabled, expected in (((), "no cloud enabled"), (("azure",), "only azure enabled")):
        cloud = FakeCloud(tmp_path / f"cloud-{len(enabled)}", image, enabled=enabled)
        with pytest.raises(CloudtuneError) as failed:
            execute(recipe, SkyPilotBackend(client=cloud, plan=a10_plan()), Recorder())
        assert expected in failed.value.message and "cloudtune check" in failed.value.hint
        assert cloud.calls() == []  # nothing asked for, so nothing to tear down
        assert Ledger().machine_for_run(Ledger().runs(1)[0]["id"])["status"] == "terminated"


# ----------------------------------------------------------------------------------------------
# Image, requirements, disk


def test_image_must_be_pinned():
    assert check_image(DEFAULT_IMAGE) == f"docker:{DEFAULT_IMAGE}"
    assert check_image("ghcr.io/x/y@sha256:" + "0" * 64).startswith("docker:ghcr.io/")
    for image in ("ubuntu", "pytorch/pytorch:latest", "Not An Image!"):
        with pytest.raises(CloudtuneError, match="compute.image"):
            check_image(image)


def test_dockerfile_bakes_what_the_machine_installs(tmp_path):
    from cloudtune.wheel import build_wheel, train_requirements

    wanted = train_requirements(build_wheel(tmp_path))
    assert (REPO / "requirements-train.txt").read_text().splitlines() == wanted, \
        "regenerate: python -m cloudtune.backends.skypilot requirements > requirements-train.txt"
    names = [re.split(r"[<>=;]", line)[0] for line in wanted]
    assert {"torch", "transformers", "peft", "bitsandbytes", "pydantic", "pyyaml"} <= set(names)
    assert "skypilot" not in names and "paramiko" not in names and "pytest" not in names
    bnb = next(line for line in wanted if line.startswith("bitsandbytes"))
    assert 'platform_system == "Linux" and platform_machine == "x86_64"' in bnb and "extra" not in bnb
    assert f"FROM {DEFAULT_IMAGE}\n" in (REPO / "Dockerfile").read_text()


def test_disk_grows_with_the_model_and_full_fine_tunes(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert disk_size_gib(recipe, None) is None  # unknown size: SkyPilot's default
    assert disk_size_gib(recipe, 1e9) == 64
    lora_70b = disk_size_gib(recipe, 140e9)
    recipe.method, recipe.outputs.merge = "full", True
    assert disk_size_gib(recipe, 140e9) > 6 * lora_70b / 2
    recipe.compute.disk_gb = 500
    assert disk_size_gib(recipe, 140e9) == 500


def test_registry_digest_with_token_auth(registry):
    from cloudtune.registry import main, resolve_digest

    assert resolve_digest(f"{registry}/cloudtune/train:1.0") == Registry.digest
    pinned = "pytorch/pytorch@sha256:" + "1" * 64
    assert resolve_digest(pinned) == "sha256:" + "1" * 64  # no network needed
    assert main([f"{registry}/cloudtune/train:nope"]) == 1


def test_the_log_copy_keeps_what_a_terminal_shows_of_progress_bars(tmp_path):
    from cloudtune.backends.base import LOG_FILE, MachineState, RunContext
    from cloudtune.backends.common import LogCopy, saved_log

    ctx = RunContext(run_id="r", machine="ct-r", work_dir=tmp_path, state=MachineState())
    with LogCopy(ctx, {"HF_TOKEN": SECRET}) as copy:
        copy.write("step 1/8 loss 2.1")
        copy.write(f"download  10%|#  |\rdownload  50%|#####  |\rdownload 100%|##########| {SECRET}\r")
        copy.write("step 2/8 loss 1.9\r")
    assert "\r" not in (tmp_path / LOG_FILE).read_text()
    assert list(saved_log(ctx)) == ["step 1/8 loss 2.1", "download 100%|##########| <redacted>", "step 2/8 loss 1.9"]


def test_dry_run_yaml_never_shows_secret_values():
    config = task_config("ct-x", {"accelerators": {"A10G": 1}}, secrets={"HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET})
    text = to_yaml(config)
    assert SECRET not in text and text.count("<redacted>") == 2
    assert config["secrets"]["HF_TOKEN"] == SECRET  # the dict for SkyPilot itself keeps the value


def test_spot_runs_as_a_managed_job_and_resumes_after_preemption(tmp_path, image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, preempt_on="step 5/8")
    recipe = tiny_recipe(tmp_path, steps=8, extra="")
    recipe.compute.spot = True
    recipe.training.checkpoint_steps = 2
    events = Recorder()
    result = execute(recipe, SkyPilotBackend(client=cloud, plan=a10_plan(spot=True)), events)

    launch = next(c for c in cloud.calls() if c["call"] == "jobs_launch")
    assert launch["name"] == f"ct-{result.run_id}" and all(launch["spot"])
    assert launch["resources"][0].startswith("AWS(g5.xlarge")  # Lambda sells no spot
    assert launch["storage"] == ["~/cloudtune/out"]
    log = "\n".join(events.lines)
    assert "preempted" in log and "cloudtune: resuming from the newest checkpoint" in log
    # a checkpoint every 2 steps, or one written on the preemption's SIGTERM: any step before the end
    assert re.search(r"resumed from step [1-7]\b", log)
    assert result.receipt["steps"] == 8
    metrics = (Path(result.receipt["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, 9))
    fetched = [c["key"] for c in cloud.calls() if c["call"] == "download"]
    assert "run.json" in fetched and "adapter/adapter_model.safetensors" in fetched
    assert not [key for key in fetched if key.startswith("checkpoints/")]  # never downloaded, only deleted
    assert [c["call"] for c in cloud.calls()][-1] == "storage_delete"
    assert not cloud.bucket(f"ct-{result.run_id}").exists() and cloud.status() == {JOBS_CONTROLLER: "UP"}
    assert not (Path(os.environ["CLOUDTUNE_HOME"]) / "runs" / result.run_id / "upload").exists()
    assert Ledger().machine_for_run(result.run_id)["status"] == "terminated"
    # `down` names SkyPilot's jobs controller and leaves it to its autostop (other managed jobs may need it)
    problems: list[str] = []
    backends = {"skypilot": SkyPilotBackend(client=cloud)}
    assert find_machines(None, backend_for=backends.__getitem__, problems=problems) == []
    assert any(p.startswith(f"{JOBS_CONTROLLER}: SkyPilot's jobs controller is UP") and f"sky down {JOBS_CONTROLLER}"
               in p for p in problems), problems


def test_an_interrupted_spot_run_keeps_its_newest_checkpoint_before_the_bucket_goes(tmp_path, image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cloud = FakeCloud(tmp_path / "fake-cloud", image, interrupt_after_lines=18)
    recipe = tiny_recipe(tmp_path, steps=40, extra="")
    recipe.compute.spot = True
    recipe.training.checkpoint_steps = 2
    with pytest.raises(KeyboardInterrupt):
        execute(recipe, SkyPilotBackend(client=cloud, plan=a10_plan(spot=True)), Recorder())
    run = Ledger().runs(1)[0]
    kept = Path(run["meta"]["checkpoint"])
    assert (kept / "COMPLETE").is_file() and (kept / "state.pt").is_file(), run["meta"]
    assert kept.name.startswith("step-") and 1 <= int(kept.name[5:]) < 40  # every 2 steps, or on the cancel
    fetched = {c["key"].split("/")[1] for c in cloud.calls() if c["call"] == "download"}
    assert fetched == {kept.name}  # one checkpoint, nothing else
    calls = [c["call"] for c in cloud.calls()]
    assert calls.index("storage_delete") > max(i for i, c in enumerate(calls) if c == "download")
    assert not cloud.bucket(f"ct-{run['id']}").exists()


def test_a_bucket_checkpoint_counts_only_with_its_marker(tmp_path):
    from cloudtune.backends.skypilot import download_checkpoint

    bucket = {"checkpoints/step-00000004/state.pt": b"four", "checkpoints/step-00000004/COMPLETE": b"",
              "checkpoints/step-00000006/state.pt": b"half",  # the machine went mid-copy: no marker
              "checkpoints/step-00000008/../../escape/COMPLETE": b"", "adapter/x": b"not a checkpoint"}
    objects = [(key, lambda path, data=data: path.write_bytes(data)) for key, data in bucket.items()]
    dest = tmp_path / "kept"
    dest.mkdir()
    kept = download_checkpoint(objects, dest)
    assert kept == dest / "step-00000004" and (kept / "state.pt").read_bytes() == b"four"
    assert sorted(p.name for p in dest.iterdir()) == ["step-00000004"]
    assert download_checkpoint([objects[2]], tmp_path / "none") is None


def test_bucket_outputs_skip_checkpoints_and_refuse_keys_outside_the_folder(tmp_path):
    """What a store lists (S3 keys, GCS blob names), fetched through the seam's download functions."""
    from cloudtune.backends.skypilot import download_outputs

    def store(*keys: str):
        return [(key, lambda path, key=key: path.write_text(key)) for key in keys]

    staging = tmp_path / "staging"
    fetched = download_outputs(store("run.json", "adapter/", "adapter/adapter_model.safetensors",
                                     "checkpoints/step-00000002/state.pt", "checkpoints/step-00000002/COMPLETE"),
                               staging)
    assert fetched == ["run.json", "adapter/adapter_model.safetensors"]
    assert (staging / "adapter" / "adapter_model.safetensors").read_text() == "adapter/adapter_model.safetensors"
    assert not (staging / "checkpoints").exists()
    for key in ("../outside", "adapter/../../outside", "/etc/passwd"):
        with pytest.raises(CloudtuneError, match="outside the outputs folder"):
            download_outputs(store(key), tmp_path / "other")
    assert not (tmp_path / "outside").exists()


# ----------------------------------------------------------------------------------------------
# The CLI


def _json_out(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_dry_run_is_the_default_backend_and_matches_cloudtune_cost(monkeypatch):
    """`cloudtune run --dry-run` launches from the plan `cloudtune cost` shows, and SkyPilot's optimizer,
    given the generated task and the bundled prices, lands on that plan's cheapest offer."""
    import sky
    from click.testing import CliRunner
    from sky import check, global_user_state, optimizer
    from sky.clouds import cloud as cloud_lib

    from cloudtune.cli import cli

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("CLOUDTUNE_BACKEND")  # no --backend: SkyPilot
    recipe = str(REPO / "tasks" / "llama2-7b-qlora-guanaco.yaml")
    runner = CliRunner()
    text = runner.invoke(cli, ["run", "--dry-run", "--gpu", "A10", recipe])
    assert text.exit_code == 0, text.output
    assert "launch order" in text.output and "HF_TOKEN: <redacted>" in text.output and SECRET not in text.output

    cost = _json_out(runner.invoke(cli, ["cost", "--gpu", "A10", "--json", recipe]))
    shown = _json_out(runner.invoke(cli, ["run", "--dry-run", "--gpu", "A10", "--json", recipe]))
    assert shown["chosen"]["offer"] == cost["chosen"]["offer"]
    assert shown["task"]["secrets"] == {"HF_TOKEN": "<redacted>"} and SECRET not in json.dumps(shown)
    assert Ledger().runs() == []  # nothing was rented, nothing recorded

    workspace = "default"
    clouds = sorted({entry["infra"] for entry in shown["task"]["resources"]["ordered"]})
    global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(workspace), workspace)
    global_user_state.set_enabled_clouds(clouds, cloud_lib.CloudCapability.COMPUTE, workspace)
    task = to_task({**shown["task"], "secrets": {"HF_TOKEN": SECRET}})
    with sky.Dag() as dag:
        dag.add(task)
    optimizer.Optimizer.optimize(dag, quiet=True)
    best, cheapest = task.best_resources, cost["chosen"]["offer"]
    assert (str(best.cloud).lower(), best.instance_type, best.region) == \
           (cheapest["cloud"], cheapest["instance_type"], cheapest["region"])
    assert best.get_cost(3600) == pytest.approx(cheapest["usd_per_hour"])

    spot = _json_out(runner.invoke(cli, ["run", "--dry-run", "--spot", "--json", recipe]))
    assert spot["managed_job"] and spot["task"]["resources"]["use_spot"] is True
    assert spot["task"]["file_mounts"]["~/cloudtune/out"]["mode"] == "MOUNT_CACHED"


def test_cli_user_errors_for_dry_run_pull_and_down(monkeypatch):
    from click.testing import CliRunner

    from cloudtune.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["run", "--backend", "local", "--dry-run", str(REPO / "tasks" / "demo-tiny.yaml")])
    assert result.exit_code == 2 and "rents nothing" in result.output

    ledger = Ledger()
    ledger.add_run("20260101-000000-0001", name="gone", backend="skypilot", output_dir="/tmp/nowhere")
    ledger.add_machine("ct-20260101-000000-0001", "20260101-000000-0001", "skypilot")
    ledger.set_machine("ct-20260101-000000-0001", "terminated")
    result = runner.invoke(cli, ["pull", "20260101-000000-0001"])
    assert result.exit_code == 2 and "machine is gone" in result.output

    # A machine the ledger still lists; SkyPilot's API server is off limits here, which `down` must survive.
    ledger.add_run("20260101-000000-0002", name="up", backend="skypilot")
    ledger.add_machine("ct-20260101-000000-0002", "20260101-000000-0002", "skypilot")
    result = runner.invoke(cli, ["down", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "ct-20260101-000000-0002" in result.output and "sky status" in result.output
    assert "could not list the skypilot backend's machines" in result.output
    assert ledger.machine_for_run("20260101-000000-0002")["status"] == "requested"  # dry run: nothing changed


# ----------------------------------------------------------------------------------------------
# The real SDK against a real local API server (no cloud behind it)


def _api_servers(port: int) -> list[int]:
    """Pids of SkyPilot API server processes on this port."""
    import psutil

    found = []
    for proc in psutil.process_iter(attrs=["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "-m sky.server.server" in line and re.search(rf"--port[= ]{port}\b", line):
            found.append(proc.pid)
    return found


def _stop_api_server(env: dict) -> None:
    subprocess.run([sys.executable, "-c", "from sky.client import sdk; sdk.api_stop()"], env=env,
                   capture_output=True, timeout=120)


def test_real_client_against_a_local_skypilot_api_server(tmp_path, monkeypatch):
    """SkyPilot's own client and a local API server it starts, for the calls that need no cloud: no
    credentials here and no cached check results, so cloudtune runs SkyPilot's check, which enables
    nothing, and says so naming `cloudtune check`. The server it started is stopped when it is done."""
    from sky import global_user_state
    from sky.client import sdk
    from sky.clouds import cloud as cloud_lib
    from sky.server import common as server_common

    from cloudtune.backends.skypilot import SkyClient

    from .conftest import free_port

    config = tmp_path / "sky-config.yaml"
    config.write_text("allowed_clouds: [aws, lambda]\n")  # SkyPilot's check then looks at these two only
    port = free_port()
    monkeypatch.setenv("SKYPILOT_CONFIG", str(config))
    monkeypatch.setenv("SKYPILOT_API_SERVER_LOCAL_PORT", str(port))  # never another test's or the user's server
    server_common.get_server_url.cache_clear()  # SkyPilot keeps the URL it read first for the process
    global_user_state.set_enabled_clouds([], cloud_lib.CloudCapability.COMPUTE, "default")  # nothing cached
    monkeypatch.delenv("SKYPILOT_DISABLE_LOCAL_API_SERVER")
    client = SkyClient(progress=open(os.devnull, "w"))  # noqa: SIM115
    try:
        with pytest.raises(CloudtuneError) as failed:
            SkyPilotBackend(client=client, plan=a10_plan()).usable_candidates()
        assert "no cloud enabled" in failed.value.message and "cloudtune check" in failed.value.hint
        assert "pip install 'cloudtune[aws]'" in failed.value.hint
        assert client.server.started and _api_servers(port), "cloudtune started the server, and knows it"
        assert client.status() == {} and SkyPilotBackend(client=client).list_machines() == {}
        client.down("ct-never-launched")  # SkyPilot's ClusterDoesNotExist means: already gone
        assert client.job_status("ct-never-launched", 1) is None  # SkyPilot's ClusterDoesNotExist: gone
        with pytest.raises(CloudtuneError) as gone:  # SkyPilot's own error from cancel (whichever), translated
            client.cancel("ct-never-launched", 1)
        assert gone.value.message.startswith("SkyPilot cancel") and gone.value.hint
        client.server.release()
        deadline = time.time() + 60
        while _api_servers(port) and time.time() < deadline:
            time.sleep(1)
        assert not _api_servers(port), "the API server cloudtune started must not outlive it"
    finally:
        client.server.release()
        sdk.api_stop()
        monkeypatch.undo()
        server_common.get_server_url.cache_clear()


def test_check_runs_skypilots_check_prints_clean_json_and_stops_the_server_it_started(tmp_path, ct_home):
    """`cloudtune check --json` in a fresh HOME: SkyPilot's check runs now (nothing is cached), each
    cloud says what is missing and which extra adds its libraries, stdout is only the JSON although
    SkyPilot prints while it starts its server, and no server is left once the command ends. `run
    --dry-run` needs no server at all."""
    from .conftest import free_port, sky_env

    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "sky-config.yaml"
    config.write_text("allowed_clouds: [aws, lambda]\n")
    port = free_port()
    env = {**sky_env(home, ct_home), "SKYPILOT_CONFIG": str(config), "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
           "HF_TOKEN": SECRET}
    env.pop("SKYPILOT_DISABLE_LOCAL_API_SERVER")
    env.pop("CLOUDTUNE_BACKEND", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cloudtune.cli", *args], env=env, capture_output=True,
                              text=True, timeout=580)

    try:
        dry = cli("run", "--dry-run", "--gpu", "A10", str(REPO / "tasks" / "llama2-7b-qlora-guanaco.yaml"))
        assert dry.returncode == 0, dry.stderr
        assert not _api_servers(port) and "API server" not in dry.stdout + dry.stderr

        checked = cli("check", "--json")
        assert checked.returncode == 0, checked.stderr
        report = json.loads(checked.stdout)
        aws, lam = report["clouds"]["aws"], report["clouds"]["lambda"]
        assert not aws["enabled"] and not lam["enabled"]
        assert "AWS" in aws["missing"] and aws["extra"] == "pip install 'cloudtune[aws]'"
        assert "lambda_keys" in lam["missing"] and lam["extra"] == "pip install 'cloudtune[lambda]'"
        assert "allowed_clouds" in report["clouds"]["gcp"]["missing"]  # not checked: outside allowed_clouds
        server = report["server"]
        assert server["local"] and server["started_by_cloudtune"] and server["url"].endswith(f":{port}")
        assert "API server" in checked.stderr  # what SkyPilot printed went to stderr
        assert not _api_servers(port), "the API server cloudtune started must not outlive it"
    finally:
        if _api_servers(port):
            _stop_api_server(env)


def test_check_shows_each_cloud_and_what_it_lacks_at_80_and_120_columns(cloud):
    """What `cloudtune check` renders, from the report a SkyClient gives (the fake: no cloud here)."""
    from rich.console import Console

    from cloudtune.render import check_table

    report = SkyPilotBackend(client=cloud).check_setup()
    assert report["clouds"]["aws"] == {"enabled": True, "missing": None, "extra": "pip install 'cloudtune[aws]'"}
    assert not report["clouds"]["azure"]["enabled"] and "azure credentials" in report["clouds"]["azure"]["missing"]
    assert {"slurm", "hyperbolic", "nebius"} <= set(report["clouds"])
    from cloudtune.planning.enabled import last_checked  # what `cost` and `gpus` mark offers by

    assert last_checked().enabled == {name for name, found in report["clouds"].items() if found["enabled"]}
    for width in (80, 120):
        console = Console(width=width, record=True)
        console.print(check_table(report["clouds"]))
        text = console.export_text()
        assert all(name in text for name in report["clouds"]), text
        assert "cloudtune[azure]" in "".join(text.split()), text  # folded, never cut off


def test_every_client_call_turns_skypilots_errors_into_one_message_and_keeps_stdout_clean(capfd):
    """The real client with no API server to reach (conftest forbids starting one): every call, the
    log streams included, fails inside SkyPilot, and each failure is a CloudtuneError with a hint;
    SkyPilot's own printing lands on stderr."""
    from sky import exceptions, sky_logging

    from cloudtune.backends.skypilot import SkyClient
    from cloudtune.backends.skypilot_sdk import output_to_stderr, translate

    client = SkyClient()
    task = to_task(task_config("ct-x", {"infra": "aws", "instance_type": "g5.xlarge"}))
    calls = {
        "launch": lambda: client.launch(task, "ct-x", autostop_minutes=5),
        "exec": lambda: client.exec(task, "ct-x"),
        "tail_logs": lambda: list(client.tail_logs("ct-x", 1, False)),
        "job_status": lambda: client.job_status("ct-x", 1),
        "cancel": lambda: client.cancel("ct-x", 1),
        "down": lambda: client.down("ct-x"),
        "status": client.status,
        "jobs_launch": lambda: client.jobs_launch(task, "ct-x"),
        "jobs_tail_logs": lambda: list(client.jobs_tail_logs(1, False)),
        "jobs_status": lambda: client.jobs_status(1),
        "jobs_cancel": lambda: client.jobs_cancel(1),
        "storage_delete": lambda: client.storage_delete("ct-x"),
        "enabled_clouds": client.enabled_clouds,
        "check": lambda: client.check(["aws"]),
    }
    for name, call in calls.items():
        with pytest.raises(CloudtuneError) as failed:
            call()
        assert "API server" in failed.value.message and failed.value.hint, name
    client.server.checked = True  # past the start: the SDK's own call fails inside the log stream
    for stream in (client.tail_logs("ct-x", 1, False), client.jobs_tail_logs(1, False)):
        with pytest.raises(CloudtuneError) as failed:
            next(stream)
        assert "SkyPilot" in failed.value.message and "API server" in failed.value.message and failed.value.hint
    with output_to_stderr():
        sky_logging.init_logger("sky.cloudtune_test").info("SkyPilot says hello")
    out, err = capfd.readouterr()
    assert out == "" and "SkyPilot says hello" in err

    assert "retry later" in translate("launch", exceptions.ResourcesUnavailableError("no capacity")).hint
    assert "cloudtune check" in translate("launch", exceptions.NoCloudAccessError("none")).hint
    assert "not supported" in translate("launch", exceptions.NotSupportedError("docker_image")).message
    not_up = exceptions.ClusterNotUpError("ct-x is INIT", cluster_status=None)
    assert "not up" in translate("job_status", not_up).message


def test_every_sdk_call_matches_skypilot_0_14_1():
    """The SkyClient calls the fake stands in for, bound against the pinned SDK's real signatures."""
    import inspect

    import sky
    from sky import clouds, exceptions
    from sky.catalog import common as catalog_common
    from sky.client import sdk
    from sky.data import storage
    from sky.server import common as server_common
    from sky.server import daemons
    from sky.utils import common

    from cloudtune.backends.skypilot import JOBS_CONTROLLER_PREFIX
    from cloudtune.planning.sky_catalog import FEATURES

    task, stream = object(), object()
    calls = [
        (sky.get, (object(),), {}),
        (sdk.enabled_clouds, (), {}),
        (sky.launch, (task,), {"cluster_name": "ct-x", "idle_minutes_to_autostop": 30, "down": True}),
        (sky.stream_and_get, (object(),), {"output_stream": stream}),
        (sky.exec, (task,), {"cluster_name": "ct-x"}),
        (sky.tail_logs, ("ct-x", 1), {"follow": True, "preload_content": False}),
        (sky.job_status, ("ct-x", [1]), {}),
        (sky.cancel, ("ct-x",), {"job_ids": [1], "all": False}),
        (sky.down, ("ct-x",), {}),
        (sky.api_cancel, ("request-id",), {"silent": True}),
        (sky.status, (["ct-x"],), {"refresh": common.StatusRefreshMode.AUTO}),
        (sky.storage_ls, (), {}),
        (sky.storage_delete, ("ct-x",), {}),
        (sky.jobs.launch, (task,), {"name": "ct-x"}),
        (sky.jobs.tail_logs, (), {"job_id": 1, "follow": True, "preload_content": False}),
        (sky.jobs.queue_v2, (), {"refresh": False, "job_ids": [1]}),
        (sky.jobs.cancel, (), {"job_ids": [1]}),
        (sdk.check, (None, False), {}),
        (sdk.api_status, (), {}),
        (sdk.api_stop, (), {}),
        (server_common.check_server_healthy_or_start_fn, (), {}),
        (server_common.get_api_server_status, (), {}),
        (server_common.is_api_server_local, (), {}),
        (server_common.get_server_url, (), {}),
        (catalog_common.read_catalog, ("aws/vms.csv",), {"pull_frequency_hours": 0}),
        (catalog_common.is_catalog_modified, ("aws/vms.csv",), {}),
        (clouds.AWS._unsupported_features_for_resources, (object(),), {}),
    ]
    for store in (storage.S3Store, storage.R2Store, storage.NebiusStore, storage.CoreWeaveStore, storage.GcsStore):
        calls.append((store, (), {"name": "ct-x", "source": None, "sync_on_reconstruction": False}))
    for function, args, kwargs in calls:
        inspect.signature(function).bind(*args, **kwargs)
    # what skypilot_sdk.py and planning/sky_catalog.py rely on besides calls
    assert {d.id for d in daemons.INTERNAL_REQUEST_DAEMONS} and server_common.ApiServerStatus.UNHEALTHY
    assert isinstance(catalog_common._ABSOLUTE_VERSIONED_CATALOG_DIR, str)
    assert set(FEATURES) <= {f.name for f in clouds.CloudImplementationFeatures}
    assert common.JOB_CONTROLLER_PREFIX == JOBS_CONTROLLER_PREFIX
    assert storage.StoreType.S3.store_prefix() == "s3://"
    caught = (exceptions.ClusterDoesNotExist, exceptions.NoCloudAccessError, exceptions.ResourcesUnavailableError)
    assert all(issubclass(kind, Exception) for kind in caught)


def test_each_cloud_extra_names_skypilots_own_extra_of_that_cloud():
    """`pip install 'cloudtune[aws]'` installs what SkyPilot 0.14.1's `skypilot[aws]` does, for every cloud
    the hints name, and `[all-clouds]` all of them."""
    from importlib.metadata import metadata

    import tomllib

    from cloudtune.backends.skypilot_sdk import ALL_CLOUDS_EXTRA, CLOUD_EXTRAS, install_hint

    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    skypilots = set(metadata("skypilot").get_all("Provides-Extra"))
    assert set(ours) - {"train", "dev"} == {*CLOUD_EXTRAS, ALL_CLOUDS_EXTRA}
    for cloud in CLOUD_EXTRAS:
        assert ours[cloud] == [f"skypilot[{cloud}]=={SKYPILOT_VERSION}"] and cloud in skypilots
        assert install_hint(cloud) == f"pip install 'cloudtune[{cloud}]'"
    [everything] = ours[ALL_CLOUDS_EXTRA]
    assert everything == f"skypilot[{','.join(CLOUD_EXTRAS)}]=={SKYPILOT_VERSION}"
    assert install_hint("hyperbolic") == f"pip install 'cloudtune[{ALL_CLOUDS_EXTRA}]'"
    assert SKYPILOT_VERSION == metadata("skypilot")["Version"]
    assert f"skypilot=={SKYPILOT_VERSION}" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "dependencies"]


def test_the_upload_of_a_cli_killed_while_skypilot_sent_it_is_removed_at_the_next_start(tmp_path):
    """The local upload (a copy of the dataset, the secrets file) outlives a SIGKILLed CLI; the next CLI
    start removes it, and never the upload of a CLI that still runs."""
    from cloudtune.lifecycle import sweep_dead_runs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ledger = Ledger()
    uploads = {}
    for who, pid in (("dead", int(gone.stdout)), ("alive", os.getpid())):
        upload = tmp_path / who / "upload"
        upload.mkdir(parents=True)
        (upload / "secrets.env").write_text(f"HF_TOKEN='{SECRET}'\n")
        run_id = ledger.add_new_run(name=who, backend="skypilot")
        ledger.add_machine(f"ct-{run_id}", run_id, "skypilot")
        ledger.set_machine(f"ct-{run_id}", "up", upload=str(upload),
                           launcher={"pid": pid, "host": socket.gethostname()})
        uploads[who] = upload
    assert sweep_dead_runs(ledger) == 1
    assert not uploads["dead"].exists() and (uploads["alive"] / "secrets.env").is_file()
