"""Where cloudtune keeps its state: $CLOUDTUNE_HOME, else ~/.cloudtune."""
import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("CLOUDTUNE_HOME") or Path.home() / ".cloudtune").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def runs_dir() -> Path:
    path = home() / "runs"
    path.mkdir(exist_ok=True)
    return path
