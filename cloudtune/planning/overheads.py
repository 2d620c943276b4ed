"""The hours a run pays for besides training: provisioning, setup, model download and load, uploads,
pulling the outputs back, teardown. Low–high ranges from per-cloud provisioning times and bandwidths.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..recipe import Recipe
from .memory import TrainSetup, lora_params
from .models import ModelInfo

# Minutes from "launch" to a machine that answers SSH, then SkyPilot's runtime, the image pull and
# `pip install .[train]` (DESIGN.md: about 3 min), and teardown until billing stops.
PROVISION_MINUTES = {"aws": (3, 8), "gcp": (2, 6), "azure": (4, 10), "lambda": (3, 8), "runpod": (1, 4),
                     "vast": (1, 6), "nebius": (3, 8), "hyperbolic": (2, 6), "fluidstack": (5, 12)}
DEFAULT_PROVISION_MINUTES = (3, 10)
SETUP_MINUTES = (3, 8)
TEARDOWN_MINUTES = (1, 3)
HUB_DOWNLOAD_BYTES_PER_S = (400e6, 100e6)  # from the Hugging Face hub to a cloud machine
LOAD_BYTES_PER_S = (2e9, 0.5e9)  # safetensors into GPU memory (quantising on the way)
UPLOAD_BYTES_PER_S = (20e6, 5e6)  # the dataset bundle from here
PULL_BYTES_PER_S = (50e6, 10e6)  # outputs back to here
# A spot run is a SkyPilot managed job, watched by SkyPilot's jobs controller: a VM of its own with
# 4+ vCPUs and 4x as much memory (sky/jobs/constants.py CONTROLLER_RESOURCES), about $0.19/h
# on-demand on AWS, GCP or Azure (m6i.xlarge, n2-standard-4, D4s_v5), up from its own provisioning
# until 10 idle minutes after the job (CONTROLLER_AUTOSTOP), when it stops itself.
CONTROLLER_PRICE_PER_HOUR = 0.20
CONTROLLER_EXTRA_MINUTES = (10 + 4, 10 + 10)  # its idle autostop, plus its provisioning


def controller_cost(hours_low: float, hours_high: float) -> tuple[float, float]:
    """Dollars for SkyPilot's jobs controller VM while it watches a spot run of these hours."""
    return tuple(CONTROLLER_PRICE_PER_HOUR * (hours + extra / 60)  # type: ignore[return-value]
                 for hours, extra in zip((hours_low, hours_high), CONTROLLER_EXTRA_MINUTES, strict=True))


@dataclass(frozen=True)
class Transfers:
    """Seconds (low, high) a run spends moving bytes: the model download and load, the dataset upload and
    the outputs back; the same on every cloud, so a plan works them out once per hardware."""

    seconds: tuple[float, float]
    what: tuple[str, ...]  # the large transfers, for the estimate's `why`


def transfers(recipe: Recipe, model: ModelInfo, setup: TrainSetup) -> Transfers:
    download = 0.0 if recipe.model.init else model.download_bytes
    dataset = recipe.dataset_file()
    upload = dataset.stat().st_size if dataset is not None and dataset.exists() else 0
    if recipe.uses_lora:
        outputs = lora_params(model.shape, setup) * 4.0  # adapters are saved in fp32
    else:
        outputs = model.shape.params * 2.0
    if recipe.outputs.merge and recipe.uses_lora:
        outputs += model.shape.params * 2.0
    seconds = tuple(download / HUB_DOWNLOAD_BYTES_PER_S[k] + model.download_bytes / LOAD_BYTES_PER_S[k]
                    + upload / UPLOAD_BYTES_PER_S[k] + outputs / PULL_BYTES_PER_S[k] for k in (0, 1))
    what = []
    if download:
        what.append(f"{download / 1e9:.1f} GB model download")
    if outputs > 1e8:
        what.append(f"{outputs / 1e9:.1f} GB of outputs back")
    return Transfers(seconds, tuple(what))  # type: ignore[arg-type]


def overhead_hours(recipe: Recipe, model: ModelInfo, setup: TrainSetup, cloud: str,
                   moved: Transfers | None = None) -> tuple[float, float, str]:
    """`moved`: transfers(recipe, model, setup), when the caller has it already."""
    moved = moved or transfers(recipe, model, setup)
    minutes = [a + b + c for a, b, c in zip(PROVISION_MINUTES.get(cloud, DEFAULT_PROVISION_MINUTES),
                                            SETUP_MINUTES, TEARDOWN_MINUTES, strict=True)]
    seconds = [m * 60.0 + extra for m, extra in zip(minutes, moved.seconds, strict=True)]
    return seconds[0] / 3600, seconds[1] / 3600, ", ".join(["provisioning", "setup", *moved.what, "teardown"])
