"""The import rules of the README's Architecture section, checked on every module of the package.

Arrows point one way: the CLI uses the core, the core uses backends and planning, backends use
planning, and nothing below looks up. Heavy libraries stay in the one place that needs each.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cloudtune"

# module prefix -> the cloudtune modules it must never import (prefixes too)
FORBIDDEN = {
    "cloudtune.errors": ["cloudtune."],
    "cloudtune.events": ["cloudtune."],
    "cloudtune.units": ["cloudtune."],
    "cloudtune.remote": ["cloudtune."],  # runs on the training machine, maybe before cloudtune's packages
    "cloudtune.planning": ["cloudtune.backends", "cloudtune.lifecycle", "cloudtune.cli", "cloudtune.render",
                           "cloudtune.train"],
    "cloudtune.backends": ["cloudtune.lifecycle", "cloudtune.cli", "cloudtune.render", "cloudtune.train"],
    "cloudtune.lifecycle": ["cloudtune.cli", "cloudtune.render", "cloudtune.train"],
    "cloudtune.receipt": ["cloudtune.cli", "cloudtune.render", "cloudtune.backends", "cloudtune.lifecycle"],
    "cloudtune.ledger": ["cloudtune.cli", "cloudtune.render", "cloudtune.backends", "cloudtune.lifecycle"],
    "cloudtune.recipe": ["cloudtune.cli", "cloudtune.render", "cloudtune.backends", "cloudtune.lifecycle",
                         "cloudtune.planning", "cloudtune.train"],
    "cloudtune.train": ["cloudtune.cli", "cloudtune.render", "cloudtune.backends", "cloudtune.lifecycle",
                        "cloudtune.ledger"],
    "cloudtune.render": ["cloudtune.backends", "cloudtune.lifecycle", "cloudtune.train"],
    "cloudtune.report": ["cloudtune.cli", "cloudtune.render", "cloudtune.backends", "cloudtune.lifecycle",
                         "cloudtune.train"],
}
# third-party package -> the only modules (prefixes) allowed to import it
CONFINED = {
    "torch": ["cloudtune.train"],
    "peft": ["cloudtune.train"],
    "trl": ["cloudtune.train"],
    "bitsandbytes": ["cloudtune.train"],
    # the tokenizer counts a dataset's tokens before anything is rented
    "transformers": ["cloudtune.train", "cloudtune.datasets"],
    "sky": ["cloudtune.backends.skypilot", "cloudtune.backends.skypilot_sdk", "cloudtune.planning.sky_catalog"],
    "paramiko": ["cloudtune.backends.ssh"],
    "matplotlib": ["cloudtune.report"],
    "gguf": ["cloudtune.train"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything a module imports, at any depth (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def _matches(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_arrows(path):
    name = module_name(path)
    imported = imports_of(path)
    for owner, forbidden in FORBIDDEN.items():
        if not _matches(name, owner):
            continue
        bad = sorted(i for i in imported for f in forbidden if _matches(i, f) and not _matches(i, owner))
        assert not bad, f"{name} must not import {bad} (see README, Architecture)"
    for library, allowed in CONFINED.items():
        if any(_matches(name, a) for a in allowed):
            continue
        bad = sorted(i for i in imported if _matches(i, library))
        assert not bad, f"{name} imports {library}; only {allowed} may"


def test_nothing_imports_the_cli():
    users = [module_name(p) for p in MODULES if module_name(p) != "cloudtune.cli"
             and any(_matches(i, "cloudtune.cli") for i in imports_of(p))]
    assert users == []


def test_the_rules_see_real_imports():
    # The checker itself: a relative import resolves, and a known arrow is found.
    assert "cloudtune.backends.base.Backend" in imports_of(PACKAGE / "lifecycle.py")
    assert any(_matches(i, "torch") for i in imports_of(PACKAGE / "train" / "loop.py"))


MAX_FUNCTION_LINES = 60
# The training loop reads top to bottom as one recipe (torchtune's habit); everything else is short.
LONG_ALLOWED = {("cloudtune.train.loop", "train")}


def test_functions_are_short():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (module_name(path), node.name) not in LONG_ALLOWED:
                    long.append(f"{module_name(path)}:{node.name} ({lines} lines)")
    assert long == []


def test_the_package_passes_ruff_with_its_complexity_limit():
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run([str(ruff), "check", "--output-format", "concise", str(PACKAGE)], capture_output=True,
                          text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
