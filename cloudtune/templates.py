"""The ready recipes `cloudtune init` copies (tasks/*.yaml, shipped as cloudtune.tasks) and their sample data."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import CloudtuneError


@dataclass
class Written:
    path: Path
    template: str
    copied: list[str]  # sample data files written beside the recipe
    run_command: str  # what to type next to train it


def templates() -> dict[str, Traversable]:
    folder = resources.files("cloudtune.tasks")
    return {entry.name[:-5]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def summaries() -> dict[str, str]:
    """Each template's first line: what it trains."""
    return {name: entry.read_text().splitlines()[0].lstrip("# ") for name, entry in sorted(templates().items())}


def write(path: Path, template: str, force: bool = False) -> Written:
    known = templates()
    if template not in known:
        raise CloudtuneError(f"no template '{template}'.", f"Choose one of: {', '.join(sorted(known))}.")
    if path.exists() and not force:
        raise CloudtuneError(f"{path} already exists.", "Pass --force to overwrite it, or choose another path.")
    text = known[template].read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return Written(path=path, template=template, copied=_copy_data(text, path.parent),
                   run_command=_run_command(text, template, path))


def _run_command(template_text: str, template: str, path: Path) -> str:
    """The run command the template's header suggests (the demo runs locally, the others name a GPU),
    pointed at the user's copy."""
    for line in template_text.splitlines():
        if not line.startswith("#"):
            break
        command = line.lstrip("# ").split("  #")[0].strip()
        if command.startswith("cloudtune run "):
            return command.replace(f"tasks/{template}.yaml", str(path))
    return f"cloudtune run {path}"


def _copy_data(text: str, dest: Path) -> list[str]:
    """Templates that point at bundled sample data get a copy of it beside the new recipe."""
    copied = []
    data = resources.files("cloudtune.tasks") / "data"
    for entry in data.iterdir():
        relative = f"data/{entry.name}"
        if relative in text and not (dest / relative).exists():
            (dest / "data").mkdir(exist_ok=True)
            (dest / relative).write_bytes(entry.read_bytes())
            copied.append(relative)
    return copied
