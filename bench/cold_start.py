"""How long `cloudtune cost` and `cloudtune gpus` take from a fresh HOME (the first command a new user
types) and from a warm one, as subprocesses of the installed entry point's code. CPU only, no network.

    python bench/cold_start.py [--repeat 5] [--recipe tasks/demo-tiny.yaml] [--label COMMIT]

Prints one JSON line per command and appends it to bench/results/cold_start.jsonl. The goal is 1 s
wall from cold; the median over repeats is the figure, and `load` (the 1-minute load average before
the runs) says how busy the machine was, since a shared machine slows every figure alike. cloudtune's
bytecode is compiled first, as pip does when it installs the package.
"""
from __future__ import annotations

import argparse
import compileall
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, record

COMMANDS = (["cost", "{recipe}"], ["gpus"], ["--help"])


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one `cloudtune ARGS` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cloudtune.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # 1: `cost` found nothing that fits, still a full answer
        raise SystemExit(f"cloudtune {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fresh_env(scratch: Path) -> dict:
    home = Path(tempfile.mkdtemp(dir=scratch))
    # an installed package has its bytecode (pip compiles it); a shell that forbids writing it would time
    # Python compiling cloudtune's sources on every run instead
    env = {k: v for k, v in os.environ.items()
           if k not in ("SKY_RUNTIME_DIR", "CLOUDTUNE_HOME", "PYTHONDONTWRITEBYTECODE")}
    return {**env, "HOME": str(home), "CLOUDTUNE_HOME": str(home / "cloudtune"), "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1", "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "COLUMNS": "120"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--recipe", default="tasks/demo-tiny.yaml")
    parser.add_argument("--label", default="", help="which code this measures (a commit), kept in each line")
    args = parser.parse_args()
    compileall.compile_dir(REPO / "cloudtune", quiet=1)  # as pip does at install
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        for template in COMMANDS:
            command = [part.format(recipe=args.recipe) for part in template]
            cold, warm = [], []
            for _ in range(args.repeat):
                env = fresh_env(Path(scratch))
                cold.append(timed(command, env))  # a fresh HOME and CLOUDTUNE_HOME: nothing cached
                warm.append(timed(command, env))  # the same HOME again
            record("cold_start", {
                "command": f"cloudtune {' '.join(command)}", "repeat": args.repeat,
                "cold_wall_s": round(statistics.median(w for w, _ in cold), 3),
                "cold_cpu_s": round(statistics.median(c for _, c in cold), 3),
                "cold_wall_max_s": round(max(w for w, _ in cold), 3),
                "warm_wall_s": round(statistics.median(w for w, _ in warm), 3),
                "warm_cpu_s": round(statistics.median(c for _, c in warm), 3),
                "label": args.label, "load": round(load, 2), "cpus": os.cpu_count(), "machine": platform.machine(),
                "python": platform.python_version()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
