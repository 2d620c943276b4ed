"""The training side: runs on the GPU machine as `python -m cloudtune.train RECIPE --out DIR`.

The only package that imports torch, transformers, peft and bitsandbytes.
"""


class Stopped(Exception):
    """SIGTERM (a spot machine being reclaimed, `cloudtune down`) arrived; a checkpoint was saved."""

    def __init__(self, step: int, saved):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {saved} (continue with --resume)")


_quiet: list[bool] = [False]


def quiet(yes: bool) -> None:
    """Under torchrun every rank but 0 stays quiet: one training, one log (errors still go to stderr)."""
    _quiet[0] = yes


def say(message: str) -> None:
    """One line of the training log: stdout, flushed, so the CLI streams it as it happens."""
    if not _quiet[0]:
        print(message, flush=True)
