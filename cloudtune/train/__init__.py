"""The training side: runs on the GPU machine as `python -m cloudtune.train RECIPE --out DIR`.

The only package that imports torch, transformers, peft and bitsandbytes.
"""


class Stopped(Exception):
    """SIGTERM (a spot machine being reclaimed, `cloudtune down`) arrived; a checkpoint was saved."""

    def __init__(self, step: int, saved):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {saved} (continue with --resume)")


def say(message: str) -> None:
    """One line of the training log: stdout, flushed, so the CLI streams it as it happens."""
    print(message, flush=True)
