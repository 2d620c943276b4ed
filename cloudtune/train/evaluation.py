"""The eval loss of the held-out rows (dataset.eval), early stopping, and keeping the best weights.

Eval rows go through the training's own path: the same tokenizing and masking (completions_only),
the same packing and per-document attention, the same micro-batch size, so the loss means what the
training loss means. No gradients and no saved activations, so an evaluation needs less memory than
the training step the memory model sized (with the fused head its logits are never materialised,
as in training).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..recipe import Recipe
from . import checkpoint, distributed, say
from . import model as model_lib
from .data import Batcher, Encoded, on_device, row_width_multiple


@dataclass
class Evaluation:
    recipe: Recipe
    batcher: Batcher
    steps: int
    precision: model_lib.Precision
    device: torch.device
    fused_kernels: bool = False
    world: distributed.World = distributed.World()
    stopped_early: bool = False
    shares: tuple[int, ...] = ()  # the eval micro-batches each rank counted, in rank order, at the last eval

    @property
    def every(self) -> int:
        return self.recipe.training.eval_interval(self.steps)

    @property
    def encoded(self) -> Encoded:
        return self.batcher.encoded

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def loss(self, model) -> float:
        """Mean loss over every eval token that carries one, however they fall into micro-batches and ranks.

        Under torchrun each rank evaluates every world-size-th micro-batch and the ranks sum their parts: each
        part is already divided by the whole eval set's token count, which every rank knows."""
        was_training = model.training
        model.eval()  # no dropout; checkpointed layers do not recompute
        n_items = max(self.encoded.trained_tokens, 1)
        # Liger's fused head computes logits unless told not to when the model is not training.
        extra = {"skip_logits": True} if self.fused_kernels else {}
        rank, size = self.world.rank, self.world.size
        total, counted, spare = 0.0, 0, None
        with torch.no_grad():
            for index, (batch, _tokens) in enumerate(self.batcher.epoch(0)):
                if spare is None:
                    spare = batch
                if index % size == rank:
                    total += self._forward(model, batch, n_items, extra)
                    counted += 1
            # FSDP gathers each layer's weights from every rank in every forward: a rank with one micro-batch
            # fewer than the others runs one more whose loss it drops, or they would wait on it forever
            for _ in range(counted, -(-len(self.batcher) // size)):
                self._forward(model, spare, n_items, extra)
        model.train(was_training)
        parts = distributed.gathered(self.world, (total, counted))
        self.shares = tuple(share for _part, share in parts)
        return sum(part for part, _share in parts)

    def _forward(self, model, batch: dict, n_items: int, extra: dict) -> float:
        batch = on_device(batch, self.device)
        with model_lib.mixed_precision(self.precision, self.device):
            return float(model(**batch, num_items_in_batch=n_items, **extra).loss)

    def after_step(self, model, state: checkpoint.State, row: dict, out: Path) -> bool:
        """Evaluate when due, into the step's metrics row; True when early stopping ends the training."""
        if not self.due(state.step):
            return False
        t0 = time.perf_counter()
        loss = self.loss(model)
        seconds = time.perf_counter() - t0
        state.evaluations += 1
        state.eval_seconds += seconds
        state.eval_loss = loss
        row.update(eval_loss=round(loss, 5), eval_seconds=round(seconds, 3))
        if self._record(state, loss) and self.recipe.outputs.keep == "best":
            checkpoint.save_best(out, model)
        if state.best_eval_loss is not None:  # None while every loss so far was NaN or inf
            row.update(best_eval_loss=round(state.best_eval_loss, 5), best_step=state.best_step)
        return self._should_stop(state)

    def _record(self, state: checkpoint.State, loss: float) -> bool:
        """Count this loss into the best so far; True when it is the new best."""
        early = self.recipe.training.early_stopping
        margin = early.min_delta if early else 0.0
        if math.isfinite(loss) and (state.best_eval_loss is None or loss < state.best_eval_loss - margin):
            state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
            return True
        state.evals_since_best += 1
        return False

    def _should_stop(self, state: checkpoint.State) -> bool:
        early = self.recipe.training.early_stopping
        if early is None or state.evals_since_best < early.patience or state.step >= self.steps:
            return False
        self.stopped_early = True
        return True

    def stop_note(self, state: checkpoint.State) -> str:
        early = self.recipe.training.early_stopping
        return (f"early stopping: the eval loss has not improved by more than {early.min_delta:g} for "
                f"{early.patience} evaluations (best {state.best_eval_loss:.4f} at step {state.best_step}); "
                f"stopping at step {state.step} of {self.steps}")

    def finish(self, model, state: checkpoint.State, out: Path) -> dict:
        """Put the best weights back when outputs.keep says so; returns what run.json says of the eval."""
        kept = "last"
        if self.recipe.outputs.keep == "best" and (out / "checkpoints" / checkpoint.BEST).exists():
            checkpoint.restore_best(out, model)
            kept = "best"
            say(f"keep best: the weights saved are those of step {state.best_step} "
                f"(eval_loss {state.best_eval_loss:.4f}), not of the last step {state.step}")
        early = self.recipe.training.early_stopping
        return {"rows": self.encoded.rows, "tokens": sum(len(ids) for ids, _ in self.encoded.examples),
                "trained_tokens": self.encoded.trained_tokens, "every_steps": self.every,
                "evaluations": state.evaluations, "seconds": round(state.eval_seconds, 3),
                "loss": state.eval_loss, "best_loss": state.best_eval_loss, "best_step": state.best_step,
                "kept": kept, "kept_step": state.best_step if kept == "best" else state.step,
                "early_stopping": self.recipe.training.early_stopping.model_dump() if early else None,
                "stopped_early": self.stopped_early, "micro_batches_per_rank": list(self.shares)}


def make_evaluation(recipe: Recipe, encoded: Encoded | None, steps: int, precision: model_lib.Precision,
                    device: torch.device, fused_kernels: bool, pad_id: int, document_offsets: bool,
                    world: distributed.World) -> Evaluation | None:
    """The run's evaluation, or None without dataset.eval. Its micro-batches are the training's size."""
    if encoded is None:
        return None
    spec = recipe.training
    batcher = Batcher(encoded, spec.micro_batch_size, spec.max_seq_len, spec.packing, spec.seed, pad_id,
                      document_offsets=document_offsets, width_multiple=row_width_multiple(recipe.method, device))
    return Evaluation(recipe, batcher, steps, precision, device, fused_kernels, world)
