"""Start the trainer: one process for one GPU (or a CPU), torchrun for several GPUs and machines.

    python -m cloudtune.remote.launch RECIPE --out DIR [--resume]     # what every run script starts

How many processes: SkyPilot's node variables where SkyPilot runs the task (SKYPILOT_NUM_NODES,
SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_GPUS_PER_NODE), else `compute.gpu_count`
(CLOUDTUNE_GPU_COUNT, set by the CLI when the recipe names a count), else every GPU this machine
shows, else one. On a machine without GPUs a count of N starts N processes that train on the CPU
with gloo: that is how the tests run the distributed paths.

World size 1 replaces this process with `python -u -m cloudtune.train ...`, the command every
backend ran before there was a launcher. Otherwise torchrun runs as a child, so that this process can
pass SIGTERM on to it (torchrun passes it to every rank) and exit with the status of the training
(143 for stopped with a checkpoint, 2 for a user's error), which torchrun itself folds into 1.
Standard library only, like everything in cloudtune.remote.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

GPU_COUNT_ENV = "CLOUDTUNE_GPU_COUNT"
# Where each rank writes its exit status (rank-LOCAL_RANK), for this launcher to read back.
RANK_STATUS_ENV = "CLOUDTUNE_RANK_STATUS_DIR"
MASTER_PORT_ENV = "CLOUDTUNE_MASTER_PORT"
MASTER_PORT = 29500  # torchrun's own default, for machines that reach each other on it
# How long torchrun lets the ranks finish after a SIGTERM (or after one rank died) before it kills them:
# enough for a stopped step to end and its checkpoint to be written; it also bounds how long a rank
# stuck in a collective with a dead peer lingers.
SHUTDOWN_SECONDS = 120
# torchrun's own messages (its glog-style lines, the OMP_NUM_THREADS banner, and the traceback it raises
# when a rank failed) go here, beside out/, instead of into the training log the user reads: this
# launcher says which rank failed and how, and each rank says why.
TORCHRUN_LOG = "torchrun.log"
TORCHRUN_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")
OMP_BANNER = ("*****", "Setting OMP_NUM_THREADS")


@dataclass(frozen=True)
class Layout:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = MASTER_PORT

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def trainer_command(python: str, train_args: list[str], layout: Layout) -> list[str]:
    """The command line of the training on this machine: the one place it is written."""
    if layout.world_size == 1:
        return [python, "-u", "-m", "cloudtune.train", *train_args]
    command = [python, "-u", "-m", "torch.distributed.run", "--nproc-per-node", str(layout.nproc_per_node)]
    if layout.nnodes == 1:
        command.append("--standalone")  # rendezvous on a free local port: runs side by side never collide
    else:
        if not layout.master_addr:
            raise ValueError("several nodes need the address of node 0")
        command += ["--nnodes", str(layout.nnodes), "--node-rank", str(layout.node_rank),
                    "--master-addr", layout.master_addr, "--master-port", str(layout.master_port)]
    return command + ["--shutdown-timeout", str(SHUTDOWN_SECONDS), "-m", "cloudtune.train", *train_args]


def launch_env(gpu_count: int | None) -> dict[str, str]:
    """What the launcher on the machine needs from the recipe (the CLI sets it: the launcher reads no YAML)."""
    return {GPU_COUNT_ENV: str(gpu_count)} if gpu_count else {}


def visible_gpus(environ: Mapping[str, str] = os.environ) -> int:
    """NVIDIA GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else the driver's list."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return len([d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return len(list(gpus.iterdir()))
    if shutil.which("nvidia-smi"):  # containers that hide /proc/driver but ship the tool
        try:
            done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(line.startswith("GPU ") for line in done.stdout.splitlines()) if done.returncode == 0 else 0
    return 0


def _count(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() else 0


def layout_from_env(environ: Mapping[str, str] = os.environ) -> Layout:
    requested = _count(environ, GPU_COUNT_ENV)
    port = _count(environ, MASTER_PORT_ENV) or MASTER_PORT
    if "SKYPILOT_NODE_RANK" in environ:
        ips = environ.get("SKYPILOT_NODE_IPS", "").split()
        nnodes = _count(environ, "SKYPILOT_NUM_NODES") or len(ips) or 1
        nproc = _count(environ, "SKYPILOT_NUM_GPUS_PER_NODE") or requested or 1
        return Layout(nproc, nnodes, _count(environ, "SKYPILOT_NODE_RANK"), ips[0] if ips else None, port)
    return Layout(requested or visible_gpus(environ) or 1, master_port=port)


def main(argv: list[str]) -> int:
    layout = layout_from_env()
    command = trainer_command(sys.executable, argv, layout)
    if layout.world_size == 1:
        sys.stdout.flush()
        os.execv(sys.executable, command)
    return run_ranks(command, layout)


def run_ranks(command: list[str], layout: Layout) -> int:
    """Run torchrun, pass the stop signals on to it, and return what the training's local rank 0 returned."""
    status_dir = Path(tempfile.mkdtemp(prefix="cloudtune-ranks-"))
    process = subprocess.Popen(command, env={**os.environ, RANK_STATUS_ENV: str(status_dir)}, stderr=subprocess.PIPE,
                               text=True, errors="replace", bufsize=1)
    pump = threading.Thread(target=_sort_torchrun_stderr, args=(process.stderr, Path(TORCHRUN_LOG)), daemon=True)
    pump.start()
    # A signal sent to the whole process group reaches torchrun too; a second SIGTERM while it shuts the
    # ranks down only makes it send theirs again, which they ignore, so passing it on is always safe.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda _signum, _frame: process.send_signal(signal.SIGTERM))
    try:
        code = process.wait()
        pump.join(timeout=10)
        return code if code == 0 else _training_status(status_dir, layout.nproc_per_node)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _sort_torchrun_stderr(stream, kept: Path) -> None:
    """The ranks' stderr (torchrun's children share it) on to ours; torchrun's own lines to `kept`. From
    the traceback torchrun raises on a failed rank to its exit, everything is torchrun's."""
    with kept.open("a", encoding="utf-8") as log:
        in_traceback = False
        for line in stream:
            in_traceback = in_traceback or line.startswith("Traceback (most recent call last):")
            if in_traceback or TORCHRUN_LINE.match(line) or line.startswith(OMP_BANNER):
                log.write(line)
                log.flush()
            else:
                sys.stderr.write(line)
                sys.stderr.flush()


def _training_status(status_dir: Path, nproc: int) -> int:
    statuses = {}
    for rank in range(nproc):
        try:
            statuses[rank] = int((status_dir / f"rank-{rank}").read_text().strip())
        except (OSError, ValueError):
            statuses[rank] = None
    lost = [rank for rank, status in statuses.items() if status is None]
    failed = {rank: status for rank, status in statuses.items() if status not in (None, 0)}
    if lost:
        print(f"cloudtune: local rank(s) {', '.join(map(str, lost))} ended without an exit status (killed: out of "
              "memory, a signal?); torchrun stopped the others", file=sys.stderr, flush=True)
    elif failed and set(failed.values()) != {143}:
        print("cloudtune: the training failed on local rank(s) "
              + ", ".join(f"{rank} (status {status})" for rank, status in failed.items()), file=sys.stderr, flush=True)
    first = statuses[0]
    return first if first not in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
