"""The ready recipes `cloudtune init` copies (tasks/*.yaml, shipped as cloudtune.tasks) and their sample data."""
from __future__ import annotations

import re
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
    kept: list[str]  # sample data files that were there already and are used as they are
    run_command: str  # what to type next to train it

    @property
    def next_commands(self) -> list[str]:
        return [f"cloudtune validate {self.path}", f"cloudtune cost {self.path}", self.run_command]

    @property
    def notes(self) -> list[str]:
        return ([f"wrote {name}, the sample data it trains on" for name in self.copied]
                + [f"kept your {name} as it is (it is not overwritten); the recipe trains on it" for name in self.kept])

    def as_dict(self) -> dict:
        return {"path": str(self.path), "template": self.template, "copied": self.copied, "kept": self.kept,
                "next": self.next_commands}


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
    if path.is_dir():
        raise CloudtuneError(f"{path} is a folder; init writes a recipe file.",
                             f"Name the file, e.g. `cloudtune init {path / 'recipe.yaml'}`.")
    if path.exists() and not force:
        raise CloudtuneError(f"{path} already exists.", "Pass --force to overwrite it, or choose another path.")
    text = known[template].read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_for_copy(text, template, path))
    copied, kept = _copy_data(text, path.parent)
    return Written(path=path, template=template, copied=copied, kept=kept,
                   run_command=_run_command(text, template, path))


def _for_copy(text: str, template: str, path: Path) -> str:
    """The template as the user's own recipe: its header's commands name the new file, and its name
    comes from the file's name (the recipe's default), not from the template's."""
    lines = [line.replace(f"tasks/{template}.yaml", str(path)) if line.startswith("#") else line
             for line in text.splitlines(keepends=True)]
    return "".join(line for line in lines if not re.match(r"name:\s", line))


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


def _copy_data(text: str, dest: Path) -> tuple[list[str], list[str]]:
    """Templates that point at bundled sample data get a copy of it beside the new recipe; a file of
    that name already there is the user's and is never overwritten. (copied, kept)"""
    copied, kept = [], []
    data = resources.files("cloudtune.tasks") / "data"
    for entry in data.iterdir():
        relative = f"data/{entry.name}"
        if relative not in text:
            continue
        if (dest / relative).exists():
            kept.append(relative)
            continue
        (dest / "data").mkdir(exist_ok=True)
        (dest / relative).write_bytes(entry.read_bytes())
        copied.append(relative)
    return copied, kept
