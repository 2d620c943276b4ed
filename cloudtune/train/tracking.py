"""Experiment tracking: TensorBoard event files or Weights & Biases (offline works without network)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CloudtuneError
from ..recipe import Recipe


class Tracker:
    def log(self, row: dict) -> None:  # noqa: B027 - tracking "none" keeps this no-op on purpose
        pass

    def close(self) -> None:  # noqa: B027
        pass


class TensorBoard(Tracker):
    def __init__(self, logdir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run wrote after its last checkpoint; the resumed run rewrites them.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict) -> None:
        for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])
        if row.get("eval_loss") is not None:
            self.writer.add_scalar("eval/loss", row["eval_loss"], row["step"])

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, recipe: Recipe, out: Path):
        import wandb

        # A resumed run continues the same W&B run instead of starting a second one.
        id_file = out / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        try:
            self.run = wandb.init(project=recipe.tracking.project or "cloudtune", name=recipe.run_name, id=run_id,
                                  resume="allow", dir=str(out), config=recipe.model_dump(mode="json"))
        except Exception as exc:  # noqa: BLE001 - no key, no network: say what to set instead of a traceback
            raise CloudtuneError(f"tracking: W&B could not start a run ({type(exc).__name__}: {exc}).",
                                 "Add WANDB_API_KEY to the recipe's secrets, or set WANDB_MODE=offline.") from None

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(recipe: Recipe, out: Path, start_step: int = 0) -> Tracker:
    service = recipe.tracking.service
    if service == "tensorboard":
        return TensorBoard(out / "tensorboard", start_step)
    if service == "wandb":
        return WandB(recipe, out)
    return Tracker()
