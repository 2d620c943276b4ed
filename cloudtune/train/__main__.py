"""`python -m cloudtune.train RECIPE --out DIR [--resume]`: what every backend starts."""
import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ..errors import CloudtuneError
from ..recipe import load_recipe
from ..remote.checkpoints import seed_from_carried
from ..remote.launch import RANK_STATUS_ENV
from ..remote.watchdog import watch_launcher, watch_parent
from . import Stopped
from .redacted_output import DEBUG_LOG, redacted_output, secret_values

EXIT_USER_ERROR = 2
EXIT_CRASHED = 1  # what Python itself returns for an uncaught exception
EXIT_STOPPED = 143  # 128 + SIGTERM, as if the signal had ended the process, but with a checkpoint saved


def quiet_libraries() -> None:
    """Keep the streamed log to what a user reads: our step lines, warnings and errors (what libraries
    still print beyond these settings is sorted into debug.log by redacted_output)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU-kernel notices on machines without CUDA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudtune.train", description=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="directory for adapter, metrics and run.json")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = parser.parse_args(argv)
    quiet_libraries()
    watch_launcher()
    watch_parent()
    # every rank appends whole lines to the one debug log (O_APPEND), as they write to the one train log
    with redacted_output(secret_values(args.recipe), debug_log=args.out / DEBUG_LOG):
        try:
            code = _train(args)
        except Exception:  # noqa: BLE001 - printed here, inside the redaction, not by Python after it
            traceback.print_exc()
            code = EXIT_CRASHED
    _record_status(code)
    return code


def _rank_prefix() -> str:
    """Errors of every rank reach the log; all but rank 0's say whose they are."""
    rank = os.environ.get("RANK", "0")
    return f"rank {rank}: " if rank != "0" else ""


def _record_status(code: int) -> None:
    """For the launcher, which gets only torchrun's status (1 for any failure) and returns the training's."""
    folder = os.environ.get(RANK_STATUS_ENV)
    if folder:
        Path(folder, f"rank-{os.environ.get('LOCAL_RANK', '0')}").write_text(f"{code}\n")


def _train(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe, here=False)
        from .loop import train  # heavy imports only once the recipe is known to be good

        if args.resume and os.environ.get("RANK", "0") == "0" and seed_from_carried(args.out):
            print("cloudtune: resuming from the checkpoint this run carried from the one it continues", flush=True)
        try:
            train(recipe, args.out, resume=args.resume)
        except RuntimeError as exc:
            from .distributed import lost_contact

            lost = lost_contact(exc)
            if lost is None:
                raise
            print(f"error: {_rank_prefix()}{lost}", file=sys.stderr, flush=True)
            return EXIT_CRASHED
        from .distributed import leave

        leave()
    except CloudtuneError as exc:
        if not exc.told_by_main:
            print(f"error: {_rank_prefix()}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Stopped as exc:
        if not _rank_prefix():  # every rank stops at the same step: rank 0 says so for all
            print(str(exc), flush=True)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
