"""How several GPUs share one run: ddp (a copy of the model on each) or fsdp (weights, gradients and optimizer
state sharded across them). The trainer decides with it on the machine, the planner before renting.

Standard library and the memory model only: no torch, so the CLI can ask it too.
"""
from __future__ import annotations

from .planning.memory import ModelShape, TrainSetup, memory_peak, required_bytes
from .recipe import Recipe


def resolve_parallelism(recipe: Recipe, world_size: int, gpu_memory_bytes: float | None = None, *,
                        shape: ModelShape | None = None, config=None) -> str:
    """`training.parallelism` when it names one; for auto, ddp unless the model, its gradients and optimizer
    state do not fit one GPU of `gpu_memory_bytes` even with every layer recomputed (then fsdp).

    Without a GPU (`gpu_memory_bytes` None: the CPU, or a plan that has not picked one) auto is ddp. Give
    the model as a ModelShape or as its transformers config.
    """
    choice = recipe.training.parallelism
    if choice != "auto":
        return choice
    if world_size <= 1 or gpu_memory_bytes is None:
        return "ddp"
    shape = shape or ModelShape.from_config(config)
    tokens = recipe.training.micro_batch_size * recipe.training.max_seq_len
    least = memory_peak(shape, TrainSetup.from_recipe(recipe), tokens, recomputed=shape.layers)
    return "ddp" if required_bytes(least) <= gpu_memory_bytes else "fsdp"
