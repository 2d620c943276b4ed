"""Shared fixtures. Every test gets its own CLOUDTUNE_HOME and no network."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "tasks" / "demo-tiny.yaml"

# Keep every library offline: nothing here may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
# MKL picks its sgemm path by the memory alignment of each array, so the same CPU run can differ in the
# last bits between two processes; its reproducible mode keeps resume tests comparing like with like.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    """One CLOUDTUNE_HOME for the session's model cache, so the tiny model is written once."""
    return tmp_path_factory.mktemp("cloudtune-models")


@contextmanager
def module_home(shared_home: Path, tmp_path_factory):
    """A CLOUDTUNE_HOME for module-scoped fixtures, which run before the per-test one exists."""
    home = tmp_path_factory.mktemp("module-home")
    (home / "models").symlink_to(shared_home, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLOUDTUNE_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def ct_home(tmp_path, shared_home, monkeypatch) -> Path:
    home = tmp_path / "ct-home"
    home.mkdir()
    (home / "models").symlink_to(shared_home, target_is_directory=True)
    monkeypatch.setenv("CLOUDTUNE_HOME", str(home))
    return home


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def demo_recipe_text(**training) -> str:
    """The demo recipe with a few training fields overridden (e.g. fewer steps for speed)."""
    import yaml

    data = yaml.safe_load(DEMO_RECIPE.read_text())
    data["dataset"]["path"] = str(DEMO_RECIPE.parent / "data" / "demo-chat.jsonl")
    data["training"].update(training)
    return yaml.safe_dump(data)


# `cloudtune run` rents through SkyPilot by default; tests train on this machine unless they say otherwise.
os.environ.setdefault("CLOUDTUNE_BACKEND", "local")
