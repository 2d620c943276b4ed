"""The SkyPilot backend: rent the cheapest GPU that fits through SkyPilot, train there, bring the outputs back.

Built against skypilot==0.14.1 (its client SDK talks to a local API server; calls return request
ids). Apart from planning/sky_catalog.py, which reads SkyPilot's price catalogs, and skypilot_sdk.py,
what every SDK call shares, this is the only module that imports sky, and only inside functions.

How the lifecycle maps onto SkyPilot (on-demand):
  provision  sky.launch of a task that holds only resources: the plan's fitting offers, cheapest
             run first, as `ordered` alternatives (SkyPilot tries them in that order, unlike a set,
             which it would rank by $/hour). Autostop with down=True is armed at launch, so a killed
             CLI still ends the bill.
  sync       the upload folder, made locally: the bundle with the cloudtune wheel in it, the wheel's
             requirements, checksums, the setup script (and the secrets file); nothing is asked of
             SkyPilot yet.
  start      one sky.exec with the upload as the task's workdir, which SkyPilot syncs to every node, and a
             run step that first runs the setup (verify the upload, install the wheel), then the training:
             one job. (A second sky.launch with a file mount and `setup:` costs its skipped provisioning's
             checks and a setup job of its own: 13-14 s against the exec's 6 s on the test Slurm, more
             where each node is checked over SSH.) Secrets travel in the upload as a 0600 file the run
             script reads and deletes before the trainer starts, never as task envs or `secrets:`, which
             SkyPilot writes into its job script or (Slurm) its executor's command line, where `ps` shows
             them. A managed job (spot) is the exception: its upload is copied through the jobs controller
             and a bucket, so it carries SkyPilot's own task `secrets:`.
  logs       sky.tail_logs, reopened while the job runs when the stream drops (the API server out of
             reach or restarting, the request cancelled there); the job's final status it saw is the
             exit status, not asked for again.
  pull       rsync over the SSH alias SkyPilot writes for every cluster.
  teardown   sky.down, then sky.status to verify the cluster is gone.
Spot (`compute.spot`): one SkyPilot managed job, outputs and checkpoints on a bucket, `--resume`
after a preemption; pull downloads the bucket's outputs (not its checkpoints) with the cloud's SDK,
and a spot run that ends early keeps its newest complete checkpoint before the bucket is deleted.

Everything that reaches SkyPilot's API server goes through `SkyClient`, the seam tests replace.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import Field

from .. import __version__
from ..errors import CloudtuneError, RunFailed
from ..manifest import NOT_PULLED, sha256_file
from ..planning.planner import Estimate, Plan
from ..recipe import ComputeSpec, Recipe
from ..registry import parse_image
from ..remote import checkpoints
from ..remote import source as remote_source
from ..remote.make_venv import venv_key
from ..remote.watchdog import process_alive
from ..secrets import REDACTED, Redactor
from ..wheel import build_wheel, train_requirements
from .base import SECRETS_FILE, Backend, Bundle, MachineState, Quote, RunContext, write_secrets_file
from .capabilities import ChecksSetup, DryRuns, KeepsCheckpoints, ListsMachines, SpansMachines
from .common import LogCopy, bundle_wheel, saved_log
from .skypilot_sdk import (
    ALL_CLOUDS_EXTRA,
    LocalServer,
    cloud_report,
    install_hint,
    parse_check,
    sdk_calls,
    server_info,
)

SKYPILOT_VERSION = "0.14.1"
CLUSTER_PREFIX = "ct-"
JOBS_CONTROLLER_PREFIX = "sky-jobs-controller-"  # sky.utils.common.JOB_CONTROLLER_PREFIX
# The layout on the machine; scripts/skypilot_*.sh spell the same names.
REMOTE_DIR = "cloudtune"  # under the remote user's home: upload/, bundle/, out/
UPLOAD = "upload"
WHEEL_NAME = f"cloudtune-{__version__}-py3-none-any.whl"  # what build_wheel makes of this checkout
CHECKSUMS = "SHA256SUMS"
SETUP = "setup.sh"
REQUIREMENTS = "requirements-train.txt"
UPLOADED_HELPERS = ("missing_requirements", "make_venv")
MAX_ALTERNATIVES = 8
# Disk: image + [train] packages + OS, then the model, its outputs and the data on top.
BASE_DISK_GIB = 40
MIN_DISK_GIB = 64
RECOVERY = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0}
# Final job states (cluster jobs and managed jobs) and the exit status each stands for.
JOB_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "FAILED_SETUP": 1, "FAILED_DRIVER": 1, "FAILED_PRECHECKS": 1,
            "FAILED_NO_RESOURCE": 1, "FAILED_CONTROLLER": 1, "CANCELLED": None}
CANCEL_WAIT_SECONDS = 120
# A log stream that drops while the job runs is reopened, with backoff, until this long without a line.
REATTACH_SECONDS = 15 * 60
REATTACH_MAX_DELAY = 30.0
# On Slurm a cluster's files live in ~/.sky_clusters/NAME, and SkyPilot moves HOME and the working folder
# there from a line it appends to ~/.bashrc; the default .bashrc of Debian and Ubuntu returns first for a
# shell that is not interactive, such as the one rsync's server starts in. So rsync's server reads that
# file itself; elsewhere it does not exist and changes nothing.
RSYNC_PATH = "[ -f ~/.sky_ssh_rc ] && . ~/.sky_ssh_rc; rsync"
RSYNC_SOURCE_MISSING = 23  # rsync's "partial transfer": here, no checkpoints folder on the machine
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
JOB_LINE_PREFIX = re.compile(r"(?m)^\([^()\s]+, pid=\d+\) ")
# SkyPilot's API server ends the log stream of a request cancelled under it (`sky api cancel`, another user
# of a shared server) with this line and closes it, the job running on (0.14.1: sky/server/stream_utils.py).
# A server that shuts down gracefully sends a retry marker instead, which the client raises as
# RequestInterruptedError.
CANCELLED_STREAM = re.compile(r"'sky\.[\w.]+' request (\S+) cancelled\n?")
# What SkyPilot's log tailer prints while the job's log file does not exist yet (0.14.1: sky/skylet/log_lib.py):
# only a stream opened that early has these lines, so counting them would make a reopened stream skip as
# many of the job's.
WAITING_FOR_LOG = re.compile(r"INFO: Waiting [\d.]+s for the logs to be written\.\.\.\n?")

# ----------------------------------------------------------------------------------------------
# The task, as plain data: what `--dry-run` prints and what SkyPilot validates


def check_image(image: str) -> str:
    """The image as SkyPilot's `image_id`; refuses references that are not pinned."""
    try:
        ref = parse_image(image)
    except ValueError as exc:
        raise CloudtuneError(f"compute.image: {exc}.", "Write it like pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime.") \
            from None
    if ref.digest is None and ref.tag == "latest":
        raise CloudtuneError(f"compute.image '{image}' is not pinned: 'latest' changes under you.",
                             "Give an exact tag (name:1.2.3) or a digest (name@sha256:...).")
    return f"docker:{image}"


def disk_size_gib(recipe: Recipe, model_bytes: float | None) -> int | None:
    """Disk for the image, the model download, what training writes and the data; None leaves SkyPilot's default.

    Full fine-tunes write a full copy of the model plus checkpoints with optimizer state; a merge
    writes another copy. Unknown model size: SkyPilot's default disk (256 GB), which is generous.
    """
    if recipe.compute.disk_gb:
        return recipe.compute.disk_gb
    if model_bytes is None:
        return None
    model_gib = model_bytes / 2**30
    copies = 1.0  # the download
    if recipe.method == "full":
        copies += 1.0 + 2 * 3.0  # saved model, two checkpoints of bf16 weights + fp32 Adam moments
    if recipe.outputs.merge:
        copies += 1.0
    dataset = recipe.dataset_file()
    data_gib = 3 * dataset.stat().st_size / 2**30 if dataset is not None else 10.0  # file + tokenized cache
    total = BASE_DISK_GIB + model_gib * copies + data_gib
    return max(MIN_DISK_GIB, int(math.ceil(total / 10.0) * 10))


def alternatives(candidates: list[Estimate], region: str | None) -> list[dict[str, Any]]:
    """One SkyPilot resources entry per fitting offer, in the plan's order (cheapest run first)."""
    entries: list[dict[str, Any]] = []
    for estimate in candidates[:MAX_ALTERNATIVES]:
        offer = estimate.offer
        entry = {"infra": f"{offer.cloud}/{region}" if region else offer.cloud,
                 "accelerators": {offer.sky_accelerator: offer.gpu_count}}
        if offer.instance_type:
            entry["instance_type"] = offer.instance_type
        if entry not in entries:
            entries.append(entry)
    return entries


def resources_config(candidates: list[Estimate], compute: ComputeSpec, disk_gib: int | None, *,
                     managed: bool) -> dict[str, Any]:
    if not candidates:
        raise CloudtuneError("no GPU offer in the plan fits this fine-tune.",
                             "See `cloudtune cost RECIPE` for why; try another --gpu, a smaller micro_batch_size "
                             "or method qlora.")
    config: dict[str, Any] = image_resources(compute)
    if disk_gib:
        config["disk_size"] = disk_gib
    if compute.spot:
        config["use_spot"] = True
    if managed:
        config["job_recovery"] = dict(RECOVERY)
    else:
        config["autostop"] = {"idle_minutes": compute.autostop_minutes, "down": True}
    config["ordered"] = alternatives(launch_order(candidates, compute), compute.region)
    return config


def launch_order(candidates: list[Estimate], compute: ComputeSpec) -> list[Estimate]:
    """The offers SkyPilot will try, in order: the plan's fitting ones, spot-capable ones for a spot run."""
    if compute.spot:
        candidates = [e for e in candidates if e.offer.spot_price_per_hour is not None]
        if not candidates:
            raise CloudtuneError("compute.spot: none of the fitting offers comes as spot.",
                                 "Drop spot, or widen the plan to clouds that sell spot (aws, gcp, azure, nebius).")
    return candidates[:MAX_ALTERNATIVES]


def script(name: str) -> str:
    """A program the machine runs, from a real file beside this module (scripts/)."""
    return resources.files("cloudtune.backends").joinpath("scripts", name).read_text()


def image_envs(compute: ComputeSpec) -> dict[str, str]:
    python = cluster_python(compute)
    if python is not None:
        return {"CLOUDTUNE_PYTHON": python, "PYTHONUNBUFFERED": "1"}
    envs = {"CLOUDTUNE_IMAGE": compute.image, "PYTHONUNBUFFERED": "1"}
    ref = parse_image(compute.image)
    if ref.digest:
        envs["CLOUDTUNE_IMAGE_DIGEST"] = ref.pinned(ref.digest)
    return envs


# Clusters of the user's own (Slurm) -------------------------------------------------------------


def cluster_python(compute: ComputeSpec) -> str | None:
    """The cluster's Python the training uses where SkyPilot runs no image, else None (the image's).

    SkyPilot cannot run an `image_id` on Slurm without Pyxis, so there the setup step checks the
    cluster's Python for the training's packages and puts what it lacks in a venv over it, built once
    under the user's home and reused, as the SSH backend does (cloudtune/remote/make_venv.py).
    """
    return (compute.python or "python3") if compute.own_cluster else None


def image_resources(compute: ComputeSpec) -> dict[str, Any]:
    return {} if compute.own_cluster else {"image_id": check_image(compute.image)}


def cluster_setup_envs(compute: ComputeSpec, upload: Path) -> dict[str, str]:
    """What the setup step needs to prepare the cluster's Python: which one, and the name of the venv for it
    and this requirement set (kept under the login user's home, not SkyPilot's per-cluster HOME, so that
    later runs find it). Nothing where an image runs."""
    python = cluster_python(compute)
    if python is None:
        return {}
    requirements = (upload / REQUIREMENTS).read_text().splitlines()
    return {"CLOUDTUNE_PYTHON": python, "CLOUDTUNE_VENV_KEY": venv_key(python, requirements)}


def task_config(name: str, resources: dict[str, Any], *, num_nodes: int = 1, upload_dir: Path | None = None,
                wheel_name: str | None = None, run: bool = False, envs: dict[str, str] | None = None,
                secrets: dict[str, str] | None = None, outputs_bucket: str | None = None) -> dict[str, Any]:
    """A SkyPilot task YAML (as a dict). Secret values go in only for the task handed to SkyPilot.

    Every task of a run names the run's `num_nodes` (compute.num_nodes): the launch starts that many
    machines, and the run step (setup, then training) runs on each with SkyPilot's node rank and addresses.
    The upload is the task's workdir, which both `sky.exec` and a managed job bring to every node."""
    config: dict[str, Any] = {"name": name, "num_nodes": num_nodes, "resources": resources}
    if upload_dir is not None:
        config["workdir"] = str(upload_dir)
    if outputs_bucket:
        # Checkpoints and outputs outlive a preempted machine on the bucket; MOUNT_CACHED allows the
        # renames a checkpoint save does.
        config["file_mounts"] = {f"~/{REMOTE_DIR}/out": {"name": outputs_bucket, "mode": "MOUNT_CACHED"}}
    envs = dict(envs or {})
    if wheel_name:
        envs["CLOUDTUNE_WHEEL"] = wheel_name
    if run:
        config["run"] = script("skypilot_prepare.sh") + script("skypilot_run.sh")
    if envs:
        config["envs"] = envs
    if secrets:
        config["secrets"] = dict(secrets)
    return config


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    shown = json.loads(json.dumps(config))
    if "secrets" in shown:
        shown["secrets"] = {name: REDACTED for name in shown["secrets"]}
    return shown


class _TaskDumper(yaml.SafeDumper):
    """Shell scripts as literal blocks, so the printed task reads like a hand-written one."""


_TaskDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(config: dict[str, Any]) -> str:
    """The task as YAML for people to read: always with secret values redacted."""
    return yaml.dump(redacted(config), Dumper=_TaskDumper, sort_keys=False, width=120)


def to_task(config: dict[str, Any]):
    """A sky.Task, validated by SkyPilot's own task schema and resource checks (against SkyPilot's
    catalogs, or the bundled snapshot where it has none: planning/sky_catalog.py)."""
    from ..planning.sky_catalog import use_catalog_view

    use_catalog_view()
    import sky
    from sky.utils import common_utils, schemas

    try:
        # The schema checks the top-level keys, from_yaml_config everything inside them.
        common_utils.validate_schema(config, schemas.get_task_schema(), "Invalid task YAML: ")
        return sky.Task.from_yaml_config(copy.deepcopy(config))  # it consumes the dict it is given
    except (ValueError, TypeError, KeyError) as exc:
        raise CloudtuneError(f"SkyPilot {SKYPILOT_VERSION} rejects the generated task: {_redact_config(config, exc)}",
                             "This is a cloudtune bug unless compute.* in the recipe names a region or image "
                             "SkyPilot does not know; `cloudtune run --dry-run` shows the task.") from None


def _redact_config(config: dict[str, Any], exc: Exception) -> str:
    return Redactor(list((config.get("secrets") or {}).values()))(str(exc))


def prepare_upload(work_dir: Path, bundle: Bundle) -> tuple[Path, str]:
    """The one directory that goes up: the bundle (the cloudtune wheel is inside it), the wheel's
    requirements and their checksums."""
    wheel = bundle_wheel(bundle)
    upload = work_dir / UPLOAD
    shutil.rmtree(upload, ignore_errors=True)
    upload.mkdir(parents=True)
    shutil.copy2(bundle.path, upload / "bundle.tar.gz")
    (upload / REQUIREMENTS).write_text("\n".join(train_requirements(build_wheel())) + "\n")
    for helper in UPLOADED_HELPERS:  # for a cluster without an image, which checks its own Python
        (upload / f"{helper}.py").write_text(remote_source(helper))
    (upload / SETUP).write_text(script("skypilot_setup.sh"))  # run by the run step (skypilot_prepare.sh)
    names = ("bundle.tar.gz", REQUIREMENTS, *(f"{helper}.py" for helper in UPLOADED_HELPERS))
    sums = [f"{sha256_file(upload / name)}  {name}" for name in names]
    (upload / CHECKSUMS).write_text("\n".join(sums) + "\n")
    return upload, wheel


def remove_upload(ctx: RunContext) -> None:
    """The upload folder (a copy of the bundle, the dataset in it) once SkyPilot has sent it, or the run ended."""
    shutil.rmtree(ctx.work_dir / UPLOAD, ignore_errors=True)


def sweep_dead(state: dict) -> bool:
    """A run whose CLI died while SkyPilot sent its upload: the local copy of the bundle (the dataset) and
    of the secrets file is removed at the next CLI start. Cheap: one process check, no SkyPilot import."""
    upload, launcher = state.get("upload"), state.get("launcher") or {}
    if not upload or not Path(upload).exists() or launcher.get("host") != socket.gethostname():
        return False
    if launcher.get("pid") and process_alive(launcher["pid"]):
        return False
    shutil.rmtree(upload, ignore_errors=True)
    return True


def bucket_name(cluster: str) -> str:
    # Bucket names: lower case, digits, dashes; 3-63 characters on every store.
    return re.sub(r"[^a-z0-9-]", "-", cluster.lower())[:63]


# ----------------------------------------------------------------------------------------------
# The seam: every call that reaches SkyPilot's API server (and through it, a cloud)


@sdk_calls
class SkyClient:
    """SkyPilot's SDK, reduced to what cloudtune needs; the tests stand in a fake for this class only.

    Every method goes through `sdk_calls` (backends/skypilot_sdk.py): SkyPilot's exceptions become one
    message with a hint, its printing goes to stderr, and a local API server it starts is stopped at exit.
    """

    def __init__(self, progress=None):
        # SkyPilot's provisioning log goes to stderr, so `--json` output on stdout stays clean.
        self.progress = progress or sys.stderr
        self.server = LocalServer()

    def enabled_clouds(self) -> list[str]:
        """The clouds SkyPilot can use. Its cached check results, or a check run now when there are none:
        a fresh API server runs its first check in the background, and reading before it ends finds none."""
        import sky
        from sky.client import sdk

        from ..planning import enabled as enabled_clouds

        enabled = [str(cloud).lower() for cloud in sky.get(sdk.enabled_clouds())] or \
            self._run_check(io.StringIO())
        enabled_clouds.remember(enabled)  # what `cost` and `gpus` mark offers by
        return enabled

    def _run_check(self, output) -> list[str]:
        import sky
        from sky.client import sdk

        by_workspace = sky.stream_and_get(sdk.check(None, False), output_stream=output) or {}
        return sorted({cloud.lower() for clouds in by_workspace.values() for cloud, capabilities in clouds.items()
                       if "compute" in capabilities})

    def check(self, clouds: list[str]) -> dict[str, Any]:
        """`sky check` run now: each of `clouds` (and every enabled one) with what is missing, and the API server."""
        output = io.StringIO()
        enabled = self._run_check(output)
        return {"clouds": cloud_report(enabled, parse_check(output.getvalue()), clouds),
                "server": server_info(self.server)}

    def launch(self, task, cluster: str, *, autostop_minutes: int) -> str:
        """Ask for the cluster; returns the API server's request id, which `wait_launched` resolves.

        The autostop (down=True) travels in the request, but SkyPilot arms it on the machine only once
        the cluster is provisioned (its PRE_EXEC stage): until then only this request, and cancelling
        it, stands for the machine.
        """
        import sky

        return sky.launch(task, cluster_name=cluster, idle_minutes_to_autostop=autostop_minutes, down=True)

    def cancel_request(self, request_id: str) -> None:
        """Abort a request still running on the API server (a launch the user interrupted)."""
        import sky

        sky.get(sky.api_cancel(request_id, silent=True))

    def wait_launched(self, request_id: str) -> dict[str, Any]:
        """The machine SkyPilot chose. The launch's task holds only resources: no job is started."""
        import sky

        _, handle = sky.stream_and_get(request_id, output_stream=self.progress)
        return launched(handle.launched_resources)

    def exec(self, task, cluster: str) -> int:
        """The task's run as a job on the cluster, its workdir synced to every node first; the job's id."""
        import sky

        with contextlib.redirect_stdout(self.progress):  # SkyPilot prints while it uploads the workdir
            request = sky.exec(task, cluster_name=cluster)
        job_id, _ = sky.stream_and_get(request, output_stream=self.progress)
        return job_id

    def tail_logs(self, cluster: str, job_id: int | None, follow: bool) -> Iterator[str]:
        """The job's log lines, without SkyPilot's colours and its `(task, pid=N) ` before every line. A
        stream that drops ends, or raises ConnectionError (not translated by `sdk_calls`, so the backend can
        tell it from SkyPilot's verdicts and reattach: `_reattached`), as does one whose request was
        cancelled on the API server: `log_stream`."""
        import sky

        yield from log_stream(lambda: sky.tail_logs(cluster, job_id, follow=follow, preload_content=False),
                              lambda line: JOB_LINE_PREFIX.sub("", ANSI_COLOUR.sub("", line)))

    def job_status(self, cluster: str, job_id: int | None) -> str | None:
        """The job's status; None once the job or its cluster is gone. SkyPilot refreshes the cluster's
        status for this call itself, so a `status` before it would only ask the cloud twice."""
        import sky
        from sky import exceptions

        try:
            statuses = sky.get(sky.job_status(cluster, [job_id] if job_id is not None else None))
        except exceptions.ClusterDoesNotExist:
            return None
        status = next(iter(statuses.values()), None)
        return status.value if status is not None else None

    def cancel(self, cluster: str, job_id: int | None) -> None:
        import sky

        sky.get(sky.cancel(cluster, job_ids=[job_id] if job_id is not None else None, all=job_id is None))

    def down(self, cluster: str) -> None:
        import sky
        from sky import exceptions

        try:
            sky.stream_and_get(sky.down(cluster), output_stream=self.progress)
        except exceptions.ClusterDoesNotExist:
            pass

    def status(self, clusters: list[str] | None = None) -> dict[str, str]:
        """name -> SkyPilot status (INIT, UP, STOPPED), refreshed from the cloud; gone clusters are absent."""
        import sky
        from sky.utils import common

        records = sky.get(sky.status(clusters, refresh=common.StatusRefreshMode.AUTO))
        return {record["name"]: str(getattr(record["status"], "value", record["status"])) for record in records}

    def rsync_remote(self, cluster: str, path: str) -> str:
        # SkyPilot writes an SSH config entry named after each cluster (~/.sky/generated/ssh/).
        return f"{cluster}:{path}"

    def rsync_ssh(self, cluster: str, work_dir: Path) -> list[str]:
        """rsync's `-e` for the cluster: SkyPilot's SSH config entry for it, with `~` read as $HOME.

        SkyPilot keeps its state under $HOME, but OpenSSH reads `~` (its config, the key SkyPilot names) as
        the passwd entry's home; the two differ under `sudo -E`, in CI, or with a HOME of a test's own.
        The entry is (re)written first, as `sky status CLUSTER` does: a launch through the SDK leaves only
        the API server's own entry, which on Slurm reaches the login node rather than the job's allocation,
        and with a remote API server none at all.
        """
        from sky.client.cli import command  # skypilot 0.14.1; the SDK has no public call for this

        command._get_cluster_records_and_set_ssh_config([cluster])
        entry = Path(os.path.expanduser(f"~/.sky/generated/ssh/{cluster}"))
        if not entry.is_file():
            return []
        config = work_dir / "ssh_config"
        home = os.path.expanduser("~")
        config.write_text(re.sub(r"(?m)^(\s*\w+\s+)~/", lambda m: f"{m.group(1)}{home}/", entry.read_text()))
        return ["-e", f"ssh -F {shlex.quote(str(config))}", "--rsync-path", RSYNC_PATH]

    # managed jobs, for spot ----------------------------------------------------------------------

    def jobs_launch(self, task, name: str) -> int:
        import sky

        job_ids, _ = sky.stream_and_get(sky.jobs.launch(task, name=name), output_stream=self.progress)
        return job_ids[0]

    def jobs_tail_logs(self, job_id: int, follow: bool) -> Iterator[str]:
        import sky

        yield from log_stream(lambda: sky.jobs.tail_logs(job_id=job_id, follow=follow, preload_content=False))

    def jobs_status(self, job_id: int) -> str | None:
        import sky

        records = sky.get(sky.jobs.queue_v2(refresh=False, job_ids=[job_id]))[0]
        return str(records[0].status.value) if records else None

    def jobs_cancel(self, job_id: int) -> None:
        import sky

        sky.get(sky.jobs.cancel(job_ids=[job_id]))

    def bucket_objects(self, bucket: str) -> Iterator[tuple[str, Callable[[Path], None]]]:
        """Every object of a bucket SkyPilot made: its key, and a function that downloads it to a file.

        Through the cloud's Python SDK, as SkyPilot's own store classes hold it (boto3 for S3 and the
        S3-compatible stores, google-cloud-storage for GCS: what SkyPilot's cloud extras install), so
        nothing depends on a shell or on a cloud CLI being on this machine's PATH.
        """
        import sky
        from sky.data import storage

        record = next((r for r in sky.get(sky.storage_ls()) if r.name == bucket), None)
        if record is None or not record.store:
            raise CloudtuneError(f"the outputs bucket {bucket} does not exist (any more).")
        kind = storage.StoreType(record.store[0])
        s3_like = {storage.StoreType.S3: storage.S3Store, storage.StoreType.R2: storage.R2Store,
                   storage.StoreType.NEBIUS: storage.NebiusStore, storage.StoreType.COREWEAVE: storage.CoreWeaveStore}
        if kind in s3_like:  # sync_on_reconstruction=False: a bucket gone since is an error, never made anew
            handle = s3_like[kind](name=bucket, source=None, sync_on_reconstruction=False).bucket
            for item in handle.objects.all():
                yield item.key, functools.partial(_download_s3_object, handle, item.key)
        elif kind == storage.StoreType.GCS:
            handle = storage.GcsStore(name=bucket, source=None, sync_on_reconstruction=False).bucket
            for blob in handle.list_blobs():
                yield blob.name, functools.partial(_download_gcs_blob, blob)
        else:
            raise CloudtuneError(f"the outputs are in {kind.value} bucket {bucket}, which cloudtune cannot fetch.",
                                 "Fetch them with that cloud's own tool (leave out checkpoints/), then "
                                 "`cloudtune down RUN`.")

    def storage_delete(self, bucket: str) -> None:
        import sky

        sky.get(sky.storage_delete(bucket))


def log_stream(open_stream: Callable[[], Iterable[str | None]],
               clean: Callable[[str], str] = lambda line: line) -> Iterator[str]:
    """The lines of one of SkyPilot's log streams (`sky.tail_logs(..., preload_content=False)`), cleaned,
    without its None (control messages) and its WAITING_FOR_LOG lines. The stream dropping raises
    ConnectionError: the API server out of reach, gone mid-stream, restarting (RequestInterruptedError), or
    ending the stream because its request was cancelled there (CANCELLED_STREAM's line, which is not the
    job's and is not yielded). The job runs on in each case, so `_reattached` opens the stream again."""
    from sky import exceptions

    held = cancelled = None  # a line that reads as the cancellation's, kept until the stream shows it was not
    try:
        for line in open_stream():
            if line is None or WAITING_FOR_LOG.fullmatch(line):
                continue
            if held is not None:
                yield clean(held)
                held = cancelled = None
            cancelled = CANCELLED_STREAM.fullmatch(line)
            if cancelled:
                held = line
                continue
            yield clean(line)
    except (exceptions.ApiServerConnectionError, exceptions.RequestInterruptedError,
            OSError) as exc:  # OSError: requests' transport errors
        raise ConnectionError(str(exc)) from exc
    if cancelled:
        raise ConnectionError(f"SkyPilot's API server cancelled the log request {cancelled.group(1)}")


def out_of_reach(exc: BaseException) -> bool:
    """Whether an error says only that SkyPilot's API server cannot be reached now (a laptop that slept,
    a changed network), raw or as `sdk_calls` translated it, rather than a verdict on the job."""
    cause = exc.__cause__ if isinstance(exc, CloudtuneError) and exc.__cause__ is not None else exc
    if isinstance(cause, OSError):
        return True
    sky_exceptions = sys.modules.get("sky.exceptions")
    return sky_exceptions is not None and isinstance(cause, sky_exceptions.ApiServerConnectionError)


def _download_s3_object(bucket, key: str, path: Path) -> None:
    bucket.download_file(key, str(path))


def _download_gcs_blob(blob, path: Path) -> None:
    blob.download_to_filename(str(path))


def download_outputs(objects: Iterable[tuple[str, Callable[[Path], None]]], staging: Path) -> list[str]:
    """A bucket's outputs into staging, checkpoints (NOT_PULLED) left where they are; the keys fetched.

    An object named outside the bucket's folder ('..', an absolute path) stops the pull: it would
    land outside staging.
    """
    fetched = []
    for key, download in objects:
        parts = PurePosixPath(key).parts
        if key.endswith("/") or not parts or parts[0] in NOT_PULLED:
            continue  # folder markers some stores keep, and the checkpoints
        if key.startswith("/") or ".." in parts:
            raise CloudtuneError(f"the outputs bucket holds an object named {key!r}, which would land outside "
                                 "the outputs folder; nothing was installed.")
        dest = staging.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        download(dest)
        fetched.append(key)
    return fetched


def download_checkpoint(objects: Iterable[tuple[str, Callable[[Path], None]]], dest: Path) -> Path | None:
    """The newest complete checkpoint on a spot run's bucket into dest/<its name>; None when it holds none.

    A folder counts only with its marker, as on a disk (cloudtune.remote.checkpoints): the bucket mount
    uploads a checkpoint file by file, and a preempted or cancelled machine can leave one half there.
    """
    prefix = checkpoints.STEP_PREFIX
    folders: dict[str, dict[str, Callable[[Path], None]]] = {}
    for key, download in objects:
        parts = PurePosixPath(key).parts
        if len(parts) < 3 or parts[0] != checkpoints.CHECKPOINTS or not parts[1].startswith(prefix) \
                or not parts[1][len(prefix):].isdigit() or ".." in parts or key.startswith("/"):
            continue
        folders.setdefault(parts[1], {})[PurePosixPath(*parts[2:]).as_posix()] = download
    finished = sorted(name for name, files in folders.items() if checkpoints.COMPLETE in files)
    if not finished:
        return None
    newest = finished[-1]
    fetching = dest / f".fetching-{newest}"
    shutil.rmtree(fetching, ignore_errors=True)
    try:
        for relative, download in folders[newest].items():
            if relative == checkpoints.COMPLETE:
                continue
            path = fetching.joinpath(*PurePosixPath(relative).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            download(path)
        fetching.mkdir(parents=True, exist_ok=True)
        folders[newest][checkpoints.COMPLETE](fetching / checkpoints.COMPLETE)  # last, as the trainer writes it
        kept = dest / newest
        shutil.rmtree(kept, ignore_errors=True)
        fetching.rename(kept)
        return kept
    finally:
        shutil.rmtree(fetching, ignore_errors=True)


def launched(resources) -> dict[str, Any]:
    """What the ledger keeps about the machine SkyPilot chose (plain data, for reattaching)."""
    accelerators = resources.accelerators or {}
    return {"cloud": str(resources.cloud).lower(), "region": resources.region, "zone": resources.zone,
            "instance_type": resources.instance_type, "accelerators": {k: int(v) for k, v in accelerators.items()},
            "spot": bool(resources.use_spot), "price_per_hour": round(resources.get_cost(3600), 4)}


# ----------------------------------------------------------------------------------------------
# The backend


class SkyPilotState(MachineState):
    offers: list[str] = Field(default_factory=list, description="cloud:instance_type of each alternative offered "
                                                                  "to SkyPilot, in launch order.")
    managed_job: bool = Field(False, description="A spot run: a SkyPilot managed job, not a cluster of our own.")
    bucket: str | None = Field(None, description="The managed job's bucket for checkpoints and outputs.")
    launched: dict[str, Any] | None = Field(None, description="The machine SkyPilot chose: cloud, region, "
                                                              "instance type, accelerators.")
    wheel: str | None = Field(None, description="The cloudtune wheel's file name inside the upload.")
    bundle_sha256: str | None = None
    job_id: int | None = Field(None, description="SkyPilot's job id of the training (cluster job or managed job).")
    upload: str | None = Field(None, description="The local upload folder (bundle, and the secrets file while "
                                                 "SkyPilot sends it) and the CLI process that removes it once sent.")
    launcher: dict[str, Any] | None = Field(None, description="pid and host of the CLI that made the upload.")


class SkyPilotBackend(Backend, DryRuns, ListsMachines, ChecksSetup, KeepsCheckpoints, SpansMachines):
    name = "skypilot"
    State = SkyPilotState

    def __init__(self, options=None, events=None, *, client: SkyClient | None = None, plan: Plan | None = None):
        """`plan`: one made elsewhere (the tests' fixed offers); by default `quote` makes it from the catalog."""
        super().__init__(options, events)
        self._given_plan = plan
        self.plan = plan
        self.client = client or SkyClient()
        self.model_bytes: float | None = None
        self._secrets: dict[str, dict[str, str]] = {}  # run id -> values; in memory only, never on disk
        # Runs this process provisioned, and those for which it asked SkyPilot for a machine: a run in the
        # first set but not the second never had one. (A backend rebuilt from the ledger knows neither,
        # and always asks SkyPilot.)
        self._provisioning: set[str] = set()
        self._requested: set[str] = set()
        self._listed: dict[str, str] | None = None  # every cluster SkyPilot listed for `down`
        self._final_status: dict[str, str | None] = {}  # run id -> the job's final status the log stream saw
        # Clusters this process has just seen up (it started their job, or found them UP to stop it): asking
        # SkyPilot again is a refresh through the cloud (on Slurm, seconds through the login node).
        self._seen_up: set[str] = set()

    def quote(self, recipe: Recipe, report) -> Quote:
        """The cheapest offer that fits, priced for the whole run; refused when none fits or over budget."""
        from ..planning.budget import check_budget, price_fields
        from ..planning.models import resolve_model
        from ..planning.planner import fitted_recipe, make_plan

        plan = self.plan = self._given_plan or make_plan(recipe, report)
        try:  # the disk is sized for the download; a plan made elsewhere may name a model not known here
            self.model_bytes = resolve_model(recipe).download_bytes
        except CloudtuneError:
            self.model_bytes = None
        chosen = plan.chosen
        if chosen is None:
            why = plan.estimates[0].why
            hint = ("a GPU with bf16 (A10, L4, A100, H100, ...) with --gpu, or a LoRA method" if "bf16" in why
                    else "method qlora, a shorter max_seq_len, or a bigger GPU with --gpu")
            raise CloudtuneError(f"no GPU offer fits this fine-tune: {why}.",
                                 f"See `cloudtune cost` for every offer; try {hint}.")
        check_budget(plan, recipe.compute.max_cost)
        offer = chosen.offer
        where = " ".join(filter(None, (offer.cloud, offer.region, offer.instance_type and f"({offer.instance_type})")))
        summary = (f"{chosen.label} on {where} at "
                   f"${chosen.price_per_hour:.2f}/h{' spot' if chosen.spot else ''}: est. {chosen.hours_low:.2f}–"
                   f"{chosen.hours_high:.2f} h, ${chosen.cost_low:.2f}–${chosen.cost_high:.2f} "
                   f"{'' if plan.training_priced else '+ the training, NOT priced (dataset size unknown) '}"
                   f"(prices of {plan.snapshot_date})")
        fitted, changes = fitted_recipe(recipe, chosen)
        return Quote(summary=summary, recipe=fitted, price=dict(price_fields(chosen)),
                     notes=[chosen.why, *changes, *(f"note: {note}" for note in plan.notes)])

    def dry_run(self, quote: Quote) -> dict[str, Any]:
        """The chosen offer, the fallbacks, and the task, secrets redacted.

        Nothing is uploaded or launched, and SkyPilot's API server is not contacted; the task is still
        validated by SkyPilot's own loader.
        """
        from ..ledger import machine_name

        recipe = quote.recipe
        ctx = RunContext(run_id="RUN-ID", machine=machine_name("RUN-ID"), work_dir=Path("RUN-DIR"),
                         state=self.new_state(), recipe=recipe)
        config = self.full_task(ctx)
        to_task(config)
        notes = []
        if recipe.compute.spot and not recipe.training.checkpoint_steps:
            notes.append("spot without training.checkpoint_steps: a preempted run restarts from step 0.")
        candidates = launch_order(self._candidates(), recipe.compute)
        kind = "managed job (spot, resumes after preemption)" if recipe.compute.spot else "cluster"
        return {"chosen": candidates[0].as_dict() if candidates else None,
                "fallbacks": [e.as_dict() for e in candidates[1:]], "task": redacted(config), "yaml": to_yaml(config),
                "managed_job": recipe.compute.spot, "notes": notes, "snapshot_date": self.plan.snapshot_date,
                "prices": self.plan.catalog.get("prices", f"prices of {self.plan.snapshot_date}"),
                "left_out": self.plan.left_out,
                "task_title": f"SkyPilot task ({kind}; secrets shown as <redacted>)"}

    # what the task is made of ---------------------------------------------------------------------

    def full_task(self, ctx: RunContext, *, upload_dir: Path | None = None, wheel_name: str = WHEEL_NAME,
                  secrets: dict[str, str] | None = None, candidates: list[Estimate] | None = None) -> dict[str, Any]:
        """The whole task: what a spot run launches as a managed job and what `--dry-run` prints."""
        recipe = self._recipe(ctx)
        spot = recipe.compute.spot
        resources = resources_config(self._candidates() if candidates is None else candidates, recipe.compute,
                                     disk_size_gib(recipe, self.model_bytes), managed=spot)
        return task_config(ctx.machine, resources, num_nodes=recipe.compute.num_nodes,
                           upload_dir=upload_dir or ctx.work_dir / UPLOAD,
                           wheel_name=wheel_name, run=True, envs=image_envs(recipe.compute) | ctx.train_env,
                           secrets=secrets if secrets is not None else {name: REDACTED for name in recipe.secrets},
                           outputs_bucket=bucket_name(ctx.machine) if spot else None)

    def _recipe(self, ctx: RunContext) -> Recipe:
        if ctx.recipe is None:
            raise CloudtuneError(f"run {ctx.run_id}: launching needs its recipe.")
        return ctx.recipe

    def _candidates(self) -> list[Estimate]:
        if self.plan is None:
            raise CloudtuneError("the SkyPilot backend launches from a plan; none was given.",
                                 "Use `cloudtune run`, which plans first.")
        return self.plan.candidates(MAX_ALTERNATIVES)

    def _managed(self, ctx: RunContext) -> bool:
        return ctx.state.managed_job or (ctx.recipe is not None and ctx.recipe.compute.spot)

    def usable_candidates(self) -> list[Estimate]:
        """The plan's offers on clouds SkyPilot can use; a clear error naming `cloudtune check` when none."""
        candidates = self._candidates()
        enabled = set(self.client.enabled_clouds())  # the first call that needs SkyPilot's API server
        wanted = sorted({e.offer.cloud for e in candidates})
        if not enabled:
            raise CloudtuneError("SkyPilot has no cloud enabled: no credentials were found for any cloud.",
                                 f"`cloudtune check` (or `sky check`) says what each cloud needs; the plan's offers "
                                 f"are on {', '.join(wanted)}. Each cloud's libraries come with its pip extra, e.g. "
                                 f"{install_hint(wanted[0])} (or [{ALL_CLOUDS_EXTRA}] for every cloud).")
        usable = [e for e in candidates if e.offer.cloud.lower() in enabled]
        if not usable:
            raise CloudtuneError(f"the plan's offers are on {', '.join(wanted)}, but SkyPilot has only "
                                 f"{', '.join(sorted(enabled))} enabled.",
                                 f"Set up credentials for one of {', '.join(wanted)} (`cloudtune check` says what "
                                 f"is missing), or pass --cloud {sorted(enabled)[0]} to plan on an enabled cloud.")
        return usable

    # lifecycle -----------------------------------------------------------------------------------

    def bundle_files(self, ctx: RunContext) -> dict[str, Path]:
        self._provisioning.add(ctx.run_id)  # the lifecycle's first step: a failure here rented nothing
        wheel = build_wheel()  # the machine trains with exactly the code that planned the run
        return {wheel.name: wheel}

    def provision(self, ctx: RunContext) -> None:
        recipe = self._recipe(ctx)
        ctx.state.upload = str(ctx.work_dir / UPLOAD)
        ctx.state.launcher = {"pid": os.getpid(), "host": socket.gethostname()}
        self._provisioning.add(ctx.run_id)
        candidates = self.usable_candidates()
        ctx.state.offers = [f"{e.offer.cloud}:{e.offer.instance_type}" for e in candidates]
        if recipe.compute.spot:
            # SkyPilot's jobs controller provisions a managed job when it is launched, in start().
            ctx.state.managed_job, ctx.state.bucket = True, bucket_name(ctx.machine)
            return
        resources = resources_config(candidates, recipe.compute, disk_size_gib(recipe, self.model_bytes), managed=False)
        ctx.state.launched = self._launch(ctx, task_config(ctx.machine, resources, num_nodes=recipe.compute.num_nodes))

    def _launch(self, ctx: RunContext, config: dict[str, Any]) -> dict[str, Any]:
        """The run's one sky.launch, of a task that holds only resources: the machine SkyPilot chose."""
        recipe = self._recipe(ctx)
        task = to_task(config)
        self._requested.add(ctx.run_id)
        try:
            request = self.client.launch(task, ctx.machine, autostop_minutes=recipe.compute.autostop_minutes)
            try:
                return self.client.wait_launched(request)
            except KeyboardInterrupt:
                self._abandon_launch(ctx, request)
                raise
        except (CloudtuneError, AttributeError, NameError, TypeError):  # ours, or a bug: not SkyPilot's verdict
            raise
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises many kinds; the lifecycle tears down either way
            raise CloudtuneError(f"provisioning {ctx.machine} failed: {type(exc).__name__}: {str(exc)[-1500:]}",
                                 "SkyPilot's output above shows the step that failed; the machine is torn down.") \
                from None

    def _abandon_launch(self, ctx: RunContext, request: str) -> None:
        """Ctrl-C while SkyPilot provisions: the request would go on on the API server, renting a machine
        nobody waits for (its autostop not armed yet), so it is cancelled; teardown then downs whatever
        cluster it had made."""
        self.events.warn(f"interrupted while SkyPilot provisions {ctx.machine}: cancelling its request")
        try:
            self.client.cancel_request(request)
        except Exception as exc:  # noqa: BLE001 - teardown still downs the cluster; the interrupt must go on
            self.events.warn(f"could not cancel SkyPilot's request {request} ({type(exc).__name__}: {exc}); "
                             f"`sky api cancel {request}` stops it")

    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        """The upload, made here; the task start() hands SkyPilot carries it as its workdir."""
        upload, wheel_name = prepare_upload(ctx.work_dir, bundle)
        ctx.state.wheel, ctx.state.bundle_sha256 = wheel_name, bundle.sha256
        self._secrets[ctx.run_id] = dict(secrets)
        if secrets and not self._managed(ctx):  # a managed job's go as SkyPilot's `secrets:` (see start)
            write_secrets_file(upload / SECRETS_FILE, secrets)

    def start(self, ctx: RunContext, resume: bool = False) -> None:
        # `resume` needs no flag here: the run script resumes whenever out/ holds a checkpoint, which is
        # also what a managed job's recovery on a new machine relies on.
        recipe = self._recipe(ctx)
        if self._managed(ctx):
            config = self.full_task(ctx, wheel_name=ctx.state.wheel, secrets=self._secrets.get(ctx.run_id, {}),
                                    candidates=self.usable_candidates())
            task = to_task(config)
            self._requested.add(ctx.run_id)
            try:
                ctx.state.job_id = self.client.jobs_launch(task, ctx.machine)
            finally:
                remove_upload(ctx)
            return
        # A job that asks for the GPUs gets them (SkyPilot sets CUDA_VISIBLE_DEVICES from the request).
        upload = ctx.work_dir / UPLOAD
        config = task_config(ctx.machine, {"accelerators": ctx.state.launched["accelerators"]},
                             num_nodes=recipe.compute.num_nodes, upload_dir=upload, wheel_name=ctx.state.wheel,
                             run=True, envs=image_envs(recipe.compute) | cluster_setup_envs(recipe.compute, upload)
                             | ctx.train_env)
        try:
            ctx.state.job_id = self.client.exec(to_task(config), ctx.machine)
            self._seen_up.add(ctx.machine)
        finally:
            remove_upload(ctx)

    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        """The job's log from SkyPilot; a redacted copy is kept locally for after the machine is gone."""
        job_id = ctx.state.job_id
        if self._managed(ctx):
            def stream() -> Iterator[str]:
                return self.client.jobs_tail_logs(job_id, follow)
        elif ctx.machine in self._seen_up or ctx.machine in self.client.status([ctx.machine]):
            def stream() -> Iterator[str]:
                return self.client.tail_logs(ctx.machine, job_id, follow)
        else:
            yield from saved_log(ctx)
            return
        lines = self._reattached(ctx, stream) if follow else stream()
        secrets = self._secrets.get(ctx.run_id)
        if secrets is None:  # only the process that launched knows the values to redact
            for line in lines:
                yield from line.rstrip("\n").split("\n")
            return
        with LogCopy(ctx, secrets) as copy:
            for line in lines:
                for part in line.rstrip("\n").split("\n"):
                    copy.write(part)
                    yield part

    def _reattached(self, ctx: RunContext, stream) -> Iterator[str]:
        """The job's log to the job's end, whatever happens to the stream on the way (a laptop that slept, a
        changed network): while the job still runs, the stream is opened again, the lines already seen
        are skipped, and the tries back off; after REATTACH_SECONDS without a new line the run is failed."""
        seen, delay, dropped_at = 0, 1.0, None
        while True:
            count = 0
            try:
                for line in stream():
                    count += 1
                    if count > seen:
                        seen, delay, dropped_at = count, 1.0, None
                        yield line
                why = "the stream ended"
            except (OSError, CloudtuneError) as exc:
                if not out_of_reach(exc):
                    raise
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
            status = self._job_status(ctx, reachable_only=False)
            if status is None or status in JOB_EXIT:
                self._final_status[ctx.run_id] = status  # exit_code's answer: a final status stays final
                return
            dropped_at = dropped_at or time.time()
            if time.time() - dropped_at > REATTACH_SECONDS:
                raise RunFailed(f"run {ctx.run_id}: the training's log stream dropped ({why}) and could not be "
                                f"reattached for {REATTACH_SECONDS / 60:.0f} minutes (the job was last {status}).",
                                f"`cloudtune logs {ctx.run_id} -f` follows it once SkyPilot answers again.")
            self.events.warn(f"log stream dropped ({why}) while the job is {status}: reattaching in {delay:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, REATTACH_MAX_DELAY)

    def _job_status(self, ctx: RunContext, reachable_only: bool = True) -> str | None:
        """SkyPilot's status of the run's job; None once the job or its cluster is gone. With
        reachable_only=False, an API server out of reach answers UNREACHABLE instead of raising."""
        job_id = ctx.state.job_id
        try:
            if self._managed(ctx):
                return self.client.jobs_status(job_id)
            return self.client.job_status(ctx.machine, job_id)
        except (OSError, CloudtuneError) as exc:
            if reachable_only or not out_of_reach(exc):
                raise
            return "UNREACHABLE"

    def exit_code(self, ctx: RunContext) -> int | None:
        if ctx.run_id in self._final_status:  # the log stream just ended on it
            status = self._final_status.pop(ctx.run_id)
        else:
            status = self._job_status(ctx)
        return JOB_EXIT.get(status or "")

    def pull(self, ctx: RunContext, staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        if self._managed(ctx):
            self._pull_bucket(ctx.state.bucket, staging)
            return
        source = self.client.rsync_remote(ctx.machine, f"{REMOTE_DIR}/out/")
        excludes = [f"--exclude=/{name}" for name in NOT_PULLED]
        done = subprocess.run(["rsync", "-a", "--partial", *self.client.rsync_ssh(ctx.machine, ctx.work_dir),
                               *excludes, source, f"{staging}/"], capture_output=True, text=True)
        if done.returncode != 0:
            raise CloudtuneError(f"copying the outputs from {ctx.machine} failed (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-1000:]}")

    def _pull_bucket(self, bucket: str | None, staging: Path) -> None:
        if not bucket:
            raise CloudtuneError("this spot run recorded no outputs bucket, so there is nothing to fetch.")
        try:
            download_outputs(self.client.bucket_objects(bucket), staging)
        except CloudtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - the cloud SDK's errors; a PullFailed keeps the bucket for a retry
            raise CloudtuneError(f"copying the outputs from bucket {bucket} failed: {type(exc).__name__}: "
                                 f"{str(exc)[:1000]}") from None

    def fetch_checkpoint(self, ctx: RunContext, dest: Path) -> Path | None:
        if self._managed(ctx):
            # Its bucket is deleted at teardown, checkpoints with it: the newest complete one is kept first.
            if not ctx.state.bucket:
                return None
            dest.mkdir(parents=True, exist_ok=True)
            return download_checkpoint(self.client.bucket_objects(ctx.state.bucket), dest)
        if ctx.machine not in self._seen_up and ctx.machine not in self.client.status([ctx.machine]):
            return None  # a cluster that is gone holds nothing
        fetched = dest / ".fetching"
        shutil.rmtree(fetched, ignore_errors=True)
        (fetched / checkpoints.CHECKPOINTS).mkdir(parents=True)
        source = self.client.rsync_remote(ctx.machine, f"{REMOTE_DIR}/out/{checkpoints.CHECKPOINTS}/")
        done = subprocess.run(["rsync", "-a", *self.client.rsync_ssh(ctx.machine, ctx.work_dir), source,
                               f"{fetched / checkpoints.CHECKPOINTS}/"], capture_output=True, text=True)
        try:
            if done.returncode not in (0, RSYNC_SOURCE_MISSING):
                raise CloudtuneError(f"copying the checkpoint from {ctx.machine} failed (exit {done.returncode}): "
                                     f"{done.stderr.strip()[-500:]}")
            found = checkpoints.complete(fetched)
            if not found:
                return None
            kept = dest / found[-1].name
            shutil.rmtree(kept, ignore_errors=True)
            found[-1].rename(kept)
            return kept
        finally:
            shutil.rmtree(fetched, ignore_errors=True)

    def stop(self, ctx: RunContext) -> None:
        job_id = ctx.state.job_id
        if self._managed(ctx):
            if job_id is not None:
                self.client.jobs_cancel(job_id)
        elif job_id is not None and self.client.status([ctx.machine]).get(ctx.machine) == "UP":
            # No job yet (interrupted while provisioning) or a cluster not UP (INIT: SkyPilot refuses to
            # cancel there, ClusterNotUpError): nothing runs to stop, and teardown downs the machine.
            self._seen_up.add(ctx.machine)
            self.client.cancel(ctx.machine, job_id)

    def teardown(self, ctx: RunContext) -> bool:
        self._secrets.pop(ctx.run_id, None)
        self._seen_up.discard(ctx.machine)
        remove_upload(ctx)
        if ctx.run_id in self._provisioning and ctx.run_id not in self._requested:
            return True  # stopped before SkyPilot was asked for anything
        if not self._managed(ctx):
            self.client.down(ctx.machine)
            return ctx.machine not in self.client.status([ctx.machine])
        job_id = ctx.state.job_id
        if job_id is not None and self.client.jobs_status(job_id) not in JOB_EXIT:
            self.client.jobs_cancel(job_id)
        if ctx.state.bucket:
            with contextlib.suppress(Exception):  # a job that never started made no bucket
                self.client.storage_delete(ctx.state.bucket)
        # A managed job's machines are gone once the job reaches a final state; cancelling takes a while.
        deadline = time.time() + CANCEL_WAIT_SECONDS
        while job_id is not None and self.client.jobs_status(job_id) not in JOB_EXIT:
            if time.time() > deadline:
                return False
            time.sleep(5)
        return True

    # for `cloudtune down` --------------------------------------------------------------------------

    check_by_hand = "run `sky status` to check for ct-... clusters"

    def list_machines(self) -> dict[str, str]:
        """Every SkyPilot cluster cloudtune named (ct-...), with its status."""
        self._listed = self.client.status()
        return {name: status for name, status in self._listed.items() if name.startswith(CLUSTER_PREFIX)}

    def shared_machines(self) -> dict[str, str]:
        """SkyPilot's jobs controller, which spot runs launch and which other managed jobs share."""
        from ..planning.overheads import CONTROLLER_PRICE_PER_HOUR

        listed = self._listed if self._listed is not None else self.client.status()
        return {name: f"SkyPilot's jobs controller is {status}: it watches spot runs (managed jobs), costs about "
                      f"${CONTROLLER_PRICE_PER_HOUR:.2f}/h while UP and stops itself 10 idle minutes after the last "
                      f"job (its disk still costs while STOPPED); `sky down {name}` removes it once no managed job "
                      "needs it" for name, status in sorted(listed.items()) if name.startswith(JOBS_CONTROLLER_PREFIX)}

    # for `cloudtune check` ---------------------------------------------------------------------------

    def check_setup(self) -> dict[str, Any]:
        """SkyPilot's check run now, for every cloud cloudtune prices and Slurm."""
        from ..planning import enabled
        from ..planning.sky_catalog import bundled_clouds

        report = self.client.check([*bundled_clouds(), "slurm"])
        enabled.remember(name for name, cloud in report["clouds"].items() if cloud["enabled"])
        return report


if __name__ == "__main__":
    # `python -m cloudtune.backends.skypilot requirements > requirements-train.txt` (the Dockerfile's list)
    if sys.argv[1:] != ["requirements"]:
        sys.exit("usage: python -m cloudtune.backends.skypilot requirements")
    print("\n".join(train_requirements(build_wheel())))
