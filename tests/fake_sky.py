"""A fake cloud behind SkyPilot's SDK: stands in for `SkyClient` only, the calls that would reach a cloud.

Each "cluster" is a directory (its home) under a root shared through the disk, so a second process
(`cloudtune down` after the CLI was killed) sees the clusters the first one launched. The tasks it
gets are real `sky.Task` objects built by the backend; their file mounts are copied, and their setup
and run scripts run for real with bash: the checksums are checked, the wheel is installed into a
fresh virtualenv (the "image"), and `python -m cloudtune.train` trains from that wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cloudtune.backends.skypilot import launched, log_stream
from cloudtune.backends.skypilot_sdk import cloud_report
from cloudtune.planning.offers import Offer
from cloudtune.planning.planner import Estimate, Plan

POLL_SECONDS = 0.1
JOBS_CONTROLLER = "sky-jobs-controller-fake0000"


def make_image(root: Path) -> Path:
    """A virtualenv whose `python3` sees this interpreter's packages, the way an image has torch & co."""
    venv = root / "image"
    if not (venv / "bin" / "python3").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        parent = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
        (site / "host-packages.pth").write_text(parent + "\n")
    return venv


class FakeCloud:
    """Duck-types `cloudtune.backends.skypilot.SkyClient`."""

    made: list[FakeCloud] = []  # every fake cloud of this process, for `down_every_cluster`

    def __init__(self, root: Path, image: Path, *, enabled: tuple[str, ...] = ("aws", "lambda", "runpod", "gcp"),
                 corrupt_on_pull: bool = False, interrupt_after_lines: int | None = None,
                 fail_after_lines: int | None = None, drop_after_lines: int | None = None,
                 cancel_after_lines: int | None = None, log_written_late: bool = False,
                 interrupt_launch: bool = False, preempt_on: str | None = None, corrupt_upload: bool = False):
        self.root = root
        self.image = image
        self.enabled = list(enabled)
        self.corrupt_on_pull = corrupt_on_pull
        self.interrupt_after_lines = interrupt_after_lines
        self.fail_after_lines = fail_after_lines  # the API server is gone: every stream breaks after N lines
        self.drop_after_lines = drop_after_lines  # one stream ends quietly after N lines, the job runs on
        # one stream's request is cancelled on the API server after N lines (`sky api cancel`), the job runs on
        self.cancel_after_lines = cancel_after_lines
        # the first stream opens before the job's log exists: SkyPilot's tailer prints that it waits for it
        self.log_written_late = log_written_late
        self.interrupt_launch = interrupt_launch  # Ctrl-C while the cluster is provisioned (INIT)
        self.corrupt_upload = corrupt_upload  # the bundle arrives changed: the setup's checksums must catch it
        self._requests: dict[str, tuple] = {}
        self.preempt_on = preempt_on  # a log line with this text: the spot machine is taken away
        self._job_tasks: dict[str, object] = {}  # managed jobs live in this process only
        self._job_cluster: dict[int, str] = {}
        self._recoveries: dict[str, int] = {}
        self._job_final: dict[int, str] = {}
        (root / "clusters").mkdir(parents=True, exist_ok=True)
        FakeCloud.made.append(self)

    # bookkeeping ---------------------------------------------------------------------------------

    def cluster_dir(self, cluster: str) -> Path:
        return self.root / "clusters" / cluster

    def home(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "home"

    def _state(self, cluster: str) -> dict:
        return json.loads((self.cluster_dir(cluster) / "state.json").read_text())

    def _save(self, cluster: str, state: dict) -> None:
        (self.cluster_dir(cluster) / "state.json").write_text(json.dumps(state))

    def record(self, call: str, **details) -> None:
        with (self.root / "calls.jsonl").open("a") as handle:
            handle.write(json.dumps({"call": call, **details}) + "\n")

    def calls(self) -> list[dict]:
        path = self.root / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _env(self, cluster: str, task) -> dict[str, str]:
        from sky.task import get_plaintext_envs_and_secrets

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(get_plaintext_envs_and_secrets(task.envs_and_secrets))
        # The "machine" has no internet: pip must find everything installed, as on a baked image.
        env.update(HOME=str(self.home(cluster)), PATH=f"{self.image / 'bin'}:{env['PATH']}", PIP_NO_INDEX="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        return env

    # SkyClient -----------------------------------------------------------------------------------

    def enabled_clouds(self) -> list[str]:
        return list(self.enabled)

    def check(self, clouds: list[str]) -> dict:
        """As SkyClient.check reports a real `sky check`: a cloud's missing part is what SkyPilot prints
        for it (here its missing credentials, as SkyPilot words them for a cloud whose libraries are in)."""
        reasons = {cloud: f"{cloud} credentials are not set up; run `sky check {cloud}`." for cloud in clouds}
        return {"clouds": cloud_report(self.enabled, reasons, clouds),
                "server": {"url": "http://127.0.0.1:46580", "local": True, "healthy": True,
                           "started_by_cloudtune": False, "stop": "`sky api stop` stops it"}}

    def launch(self, task, cluster: str, *, autostop_minutes: int) -> str:
        self.record("launch", cluster=cluster, autostop_minutes=autostop_minutes,
                    resources=[str(r) for r in task.resources], file_mounts=sorted(task.file_mounts or {}),
                    workdir=task.workdir, has_run=bool(task.run), secrets=sorted(task.secrets))
        request = f"request-{len(self._requests) + 1}"
        self._requests[request] = (task, cluster)
        return request

    def cancel_request(self, request_id: str) -> None:
        self.record("cancel_request", request=request_id)
        self._requests.pop(request_id, None)

    def wait_launched(self, request_id: str) -> dict:
        task, cluster = self._requests.pop(request_id)
        first = list(task.resources)[0]  # SkyPilot tries `ordered` alternatives in order; the first has capacity
        if not self.cluster_dir(cluster).exists():
            self.home(cluster).mkdir(parents=True)
            self._save(cluster, {"status": "INIT", "launched": None, "jobs": {}})  # the record comes first
            if self.interrupt_launch:
                raise KeyboardInterrupt
            self._save(cluster, {"status": "UP", "launched": launched(first), "jobs": {}})
        self._sync_workdir(task, cluster)
        for remote, local in (task.file_mounts or {}).items():
            target = self.home(cluster) / remote.removeprefix("~/")
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if Path(local).is_dir() else shutil.copy2)(local, target)
        for remote, storage in (task.storage_mounts or {}).items():  # a bucket outlives every machine
            bucket = self.bucket(storage.name)
            bucket.mkdir(parents=True, exist_ok=True)
            target = self.home(cluster) / remote.removeprefix("~/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.is_symlink():
                target.symlink_to(bucket, target_is_directory=True)
        if task.setup or task.run:  # as SkyPilot's launch does: one job, its setup first, queued on return
            self._submit(task, cluster, setup=True)
        return self._state(cluster)["launched"]

    def exec(self, task, cluster: str) -> int:
        """As sky.exec: the workdir synced (file mounts are not), the run as a job (setup is not run)."""
        self._sync_workdir(task, cluster)
        secrets_file = self.home(cluster) / "sky_workdir" / "secrets.env"  # what the task's upload brought
        self.record("exec", cluster=cluster, resources=[str(r) for r in task.resources], workdir=task.workdir,
                    secrets=sorted(task.secrets), envs=sorted(task.envs), has_setup=bool(task.setup),
                    secrets_file_mode=oct(secrets_file.stat().st_mode & 0o777) if secrets_file.exists() else None)
        return self._submit(task, cluster, setup=False)

    def _sync_workdir(self, task, cluster: str) -> None:
        if not task.workdir:
            return
        target = self.home(cluster) / "sky_workdir"  # SkyPilot's SKY_REMOTE_WORKDIR
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(task.workdir, target)
        if self.corrupt_upload and (target / "bundle.tar.gz").is_file():
            with (target / "bundle.tar.gz").open("ab") as handle:
                handle.write(b"\0")

    def _submit(self, task, cluster: str, *, setup: bool) -> int:
        """A job that runs the setup (a failure ends it FAILED_SETUP), then the run script in the workdir, as
        SkyPilot's job does; their output is the job log, the run's exit status the job status."""
        state = self._state(cluster)
        job_id = len(state["jobs"]) + 1
        home = self.home(cluster)
        log, exit_file = home / f".job-{job_id}.log", home / f".job-{job_id}.exit"
        steps = f": > {log}\n"
        if setup and task.setup:  # a script of its own, as SkyPilot runs it: `set -e` in it holds
            script = home / f".job-{job_id}.setup.sh"
            script.write_text(task.setup)
            steps = f"bash {script} > {log} 2>&1 || {{ echo FAILED_SETUP > {exit_file}; exit; }}\n"
        workdir = home / "sky_workdir"
        wrapper = f"{steps}( cd {workdir} 2>/dev/null; {task.run or ':'}\n) >> {log} 2>&1; echo $? > {exit_file}"
        process = subprocess.Popen(["bash", "-c", wrapper], cwd=home, env=self._env(cluster, task),
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        state["jobs"][str(job_id)] = {"pid": process.pid}
        self._save(cluster, state)
        return job_id

    def _exit(self, cluster: str, job_id: int) -> int | str | None:
        path = self.home(cluster) / f".job-{job_id}.exit"
        text = path.read_text().strip() if path.exists() else ""
        return int(text) if text.isdigit() else text or None

    def job_status(self, cluster: str, job_id: int | None) -> str | None:
        return self._job_state(cluster, job_id)

    def _job_state(self, cluster: str, job_id: int | None) -> str | None:
        """job_status for the fake's own use (its log tail polls it), apart from the SkyClient seam's."""
        if not (self.cluster_dir(cluster) / "state.json").exists():
            return None  # as SkyClient.job_status answers SkyPilot's ClusterDoesNotExist
        job = self._state(cluster)["jobs"].get(str(job_id))
        if job is None:
            return None
        if job.get("cancelled"):
            return "CANCELLED"
        code = self._exit(cluster, job_id)
        if code is None:
            return "RUNNING"
        return "SUCCEEDED" if code == 0 else code if isinstance(code, str) else "FAILED"

    def tail_logs(self, cluster: str, job_id: int | None, follow: bool) -> Iterator[str]:
        # what SkyPilot's API server sends, read as SkyClient reads it
        return log_stream(lambda: self._job_log(cluster, job_id, follow))

    def _job_log(self, cluster: str, job_id: int | None, follow: bool) -> Iterator[str]:
        if job_id is None:  # as SkyPilot does: the cluster's latest job
            job_id = len(self._state(cluster)["jobs"])
        log = self.home(cluster) / f".job-{job_id}.log"
        count = 0
        deadline = time.time() + 60  # the job's shell creates its log at once; a test must fail, not hang
        while not log.exists():
            if time.time() > deadline:
                raise ConnectionError(f"{cluster} has no log for job {job_id}")
            time.sleep(POLL_SECONDS)
        if self.log_written_late:
            self.log_written_late = False
            yield from ["INFO: Waiting 1s for the logs to be written...\n"] * 2
        with log.open() as handle:
            while True:
                line = handle.readline()
                if line.endswith("\n"):
                    count += 1
                    last = self._stream_ends(cluster, count)
                    if last is not None:
                        if last:
                            yield last
                        return
                    yield line
                    continue
                if not follow or self._job_state(cluster, job_id) != "RUNNING":
                    rest = line + handle.read()
                    yield from (part + "\n" for part in rest.splitlines())
                    return
                time.sleep(POLL_SECONDS)

    def _stream_ends(self, cluster: str, count: int) -> str | None:
        """Whether trouble asked for ends a log stream before its line `count`: raises, or returns the last
        line the stream sends ("" for none); None while it goes on."""
        if self.interrupt_after_lines is not None and count > self.interrupt_after_lines:
            raise KeyboardInterrupt
        if self.fail_after_lines is not None and count > self.fail_after_lines:
            raise ConnectionError("lost the API server while streaming logs")
        if self.drop_after_lines is not None and count > self.drop_after_lines:
            self.drop_after_lines = None
            self.record("stream_dropped", cluster=cluster, after_lines=count - 1)
            return ""
        if self.cancel_after_lines is not None and count > self.cancel_after_lines:
            self.cancel_after_lines = None
            self.record("stream_cancelled", cluster=cluster, after_lines=count - 1)
            return "'sky.logs' request 0f1e2d3c-fake cancelled\n"  # SkyPilot 0.14.1's server, then it closes
        return None

    def cancel(self, cluster: str, job_id: int | None) -> None:
        from sky import exceptions

        self.record("cancel", cluster=cluster, job_id=job_id)
        state = self._state(cluster)
        if state["status"] != "UP":  # as SkyPilot's cancel does on a cluster still provisioning
            raise exceptions.ClusterNotUpError(f"{cluster} is {state['status']}", cluster_status=None)
        for key, job in state["jobs"].items():
            if job_id is None or key == str(job_id):
                _kill(job["pid"])
                job["cancelled"] = self._exit(cluster, int(key)) is None
        self._save(cluster, state)

    def down(self, cluster: str) -> None:
        self.record("down", cluster=cluster)
        if not self.cluster_dir(cluster).exists():
            return
        for job in self._state(cluster)["jobs"].values():
            _kill(job["pid"])
        shutil.rmtree(self.cluster_dir(cluster))

    def status(self, clusters: list[str] | None = None) -> dict[str, str]:
        found = {path.name: self._state(path.name)["status"] for path in (self.root / "clusters").iterdir()
                 if (path / "state.json").exists()}
        return {name: status for name, status in found.items() if clusters is None or name in clusters}

    # managed jobs: a controller that provisions, runs and, after a preemption, recovers ---------------

    def bucket(self, name: str) -> Path:
        return self.root / "buckets" / name

    def jobs_launch(self, task, name: str) -> int:
        self.record("jobs_launch", name=name, resources=[str(r) for r in task.resources],
                    spot=[r.use_spot for r in task.resources], secrets=sorted(task.secrets),
                    storage=sorted(task.storage_mounts or {}))
        # As SkyPilot's controller does, the local file mounts are uploaded once, at launch: a recovery
        # on a new machine needs nothing of the laptop's.
        uploaded = {}
        for index, (remote, local) in enumerate(sorted((task.file_mounts or {}).items())):
            copy = self.root / "job-uploads" / name / str(index)
            (shutil.copytree if Path(local).is_dir() else shutil.copy2)(local, copy)
            uploaded[remote] = str(copy)
        task.set_file_mounts(uploaded or None)
        if task.workdir:  # the controller's bucket holds the workdir for every recovery
            copy = self.root / "job-uploads" / name / "workdir"
            shutil.copytree(task.workdir, copy)
            task.workdir = str(copy)
        self._job_tasks[name] = task
        self._recoveries[name] = 0
        controller = self.cluster_dir(JOBS_CONTROLLER)
        if not controller.exists():  # SkyPilot's jobs controller: launched with the first managed job, then kept
            (controller / "home").mkdir(parents=True)
            self._save(JOBS_CONTROLLER, {"status": "UP", "launched": {}, "jobs": {}})
        self._start_job(name)
        return 1

    def _start_job(self, name: str) -> None:
        cluster = f"{name}-{self._recoveries[name]}"
        task = self._job_tasks[name]
        self.wait_launched(self.launch(task, cluster, autostop_minutes=0))  # its run starts as a job
        self._job_cluster[1] = cluster

    def jobs_tail_logs(self, job_id: int, follow: bool) -> Iterator[str]:
        name = next(iter(self._job_tasks))
        while True:
            cluster = self._job_cluster[job_id]
            for line in self.tail_logs(cluster, 1, follow):
                yield line
                if self.preempt_on and self.preempt_on in line and self._recoveries[name] == 0:
                    break
            else:
                return
            self.down(cluster)
            self._recoveries[name] += 1
            yield f"(the controller) {cluster} was preempted; recovering on a new machine\n"
            self._start_job(name)

    def jobs_status(self, job_id: int) -> str | None:
        cluster = self._job_cluster.get(job_id)
        if cluster is None:
            return None
        if not self.cluster_dir(cluster).exists():
            return self._job_final.get(job_id, "CANCELLED")
        status = self._job_state(cluster, 1)
        if status in ("SUCCEEDED", "FAILED"):  # the controller takes a finished job's machine down itself
            self._job_final[job_id] = status
            self.down(cluster)
        return status

    def jobs_cancel(self, job_id: int) -> None:
        self.record("jobs_cancel", job_id=job_id)
        self.down(self._job_cluster[job_id])

    def bucket_objects(self, bucket: str):
        """The bucket's files as a store lists objects (keys, no folders), each downloaded on demand."""
        root = self.bucket(bucket)

        def download(key: str, path: Path) -> None:
            self.record("download", bucket=bucket, key=key)
            shutil.copy2(root / key, path)

        for path in sorted(root.rglob("*")):
            if path.is_file():
                key = path.relative_to(root).as_posix()
                yield key, lambda dest, key=key: download(key, dest)

    def storage_delete(self, bucket: str) -> None:
        self.record("storage_delete", bucket=bucket)
        shutil.rmtree(self.bucket(bucket), ignore_errors=True)

    def rsync_remote(self, cluster: str, path: str) -> str:
        source = self.home(cluster) / path
        if self.corrupt_on_pull and source.is_dir():
            # The bytes arrive changed (the machine keeps good ones): the manifest must catch it.
            damaged = self.root / "in-transit" / cluster
            shutil.rmtree(damaged, ignore_errors=True)
            shutil.copytree(source, damaged)
            with (damaged / "run.json").open("a") as handle:
                handle.write(" ")
            return str(damaged) + "/"
        return str(source) + "/"

    def rsync_ssh(self, cluster: str, work_dir: Path) -> list[str]:
        return []  # the fake cluster's files are on this machine


def _group_alive(pgid: int) -> bool:
    """Any live (not zombie) process left in the job's process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def down_every_cluster() -> None:
    """After a test, pass or fail: no training of a fake cluster outlives it (a failed assert skips the
    test's own teardown)."""
    while FakeCloud.made:
        cloud = FakeCloud.made.pop()
        for name in cloud.status() if (cloud.root / "clusters").is_dir() else {}:
            cloud.down(name)


def _kill(pgid: int) -> None:
    if not _group_alive(pgid):
        return
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + 10
    while _group_alive(pgid):
        if time.time() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(POLL_SECONDS)


def offer_estimate(cloud: str, region: str, instance_type: str, gpu: str, count: int, memory: float, price: float,
                   cost: float, spot_price: float | None = None, *, spot: bool = False, fits: bool = True) -> Estimate:
    """An Estimate as the cost model makes them (plain data), for plans built by hand in tests."""
    offer = Offer(cloud=cloud, region=region, instance_type=instance_type, gpu=gpu, gpu_count=count,
                  gpu_memory_gib=memory, price_per_hour=price, spot_price_per_hour=spot_price)
    hours = cost / (spot_price if spot and spot_price else price)
    return Estimate(offer=offer, spot=spot, fits=fits, peak_gib=memory * 0.6, micro_batch_size=4,
                    gradient_checkpointing=False, tokens=10**6, tokens_per_s_low=1000, tokens_per_s_high=2000,
                    hours_low=hours * 0.8, hours_high=hours, cost_low=cost * 0.8, cost_high=cost,
                    why="built by hand for a test")


def a10_plan(spot: bool = False) -> Plan:
    """Three fitting 24 GB offers from the bundled snapshot, ordered by $/run, plus one that does not fit.

    Lambda's A10 is dearer per hour than AWS's A10G but cheaper per run (faster card): the order
    SkyPilot must keep. Prices are the snapshot's.
    """
    estimates = [
        offer_estimate("lambda", "us-east-1", "gpu_1x_a10", "A10", 1, 24, 1.29, 2.10, None, spot=spot),
        offer_estimate("aws", "us-east-1", "g5.xlarge", "A10G", 1, 24, 1.006, 2.30, 0.377, spot=spot),
        offer_estimate("aws", "us-east-1", "g6.xlarge", "L4", 1, 24, 0.8048, 2.90, 0.0913, spot=spot),
        offer_estimate("aws", "us-east-1", "g4dn.xlarge", "T4", 1, 16, 0.526, 1.00, 0.0631, spot=spot, fits=False),
    ]
    return Plan(tokens=10**6, tokens_exact=True, snapshot_date="2026-11-23", estimates=estimates)


if __name__ == "__main__":
    # python -m tests.fake_sky RECIPE ROOT IMAGE: `cloudtune run` on the fake cloud, in its own process,
    # so a test can kill it mid-run like a user closing the terminal.
    from cloudtune.backends.skypilot import SkyPilotBackend
    from cloudtune.lifecycle import run
    from cloudtune.recipe import load_recipe

    recipe_path, root, image = sys.argv[1:4]
    cloud = FakeCloud(Path(root), Path(image))
    run(load_recipe(recipe_path), SkyPilotBackend(client=cloud, plan=a10_plan()))
