"""Recipe YAML read with limits, so a hostile file costs milliseconds and a clear message.

PyYAML's safe loader still recurses once per nesting level (500 levels: RecursionError), follows
aliases into themselves (`a: &a [*a]`), expands aliases of aliases without bound (1.5 KB can hold
billions of values) and lets the last of two equal keys win silently. Here the document is composed
once under a depth, alias and size budget, checked for duplicate keys and unprintable text on the
composed nodes (each node once, however often aliases repeat it), and only then constructed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import CloudtuneError
from .inputs import text_problem

MAX_DEPTH = 32  # a recipe is 3 levels deep; samples lists add one
MAX_ALIASES = 64
MAX_VALUES = 20_000  # values after expanding aliases; the longest shipped recipe has about 60
MAX_NUMBER_CHARS = 40  # no setting needs more digits; Python refuses ints above 4,300 digits anyway
MERGE_TAG = "tag:yaml.org,2002:merge"
NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
HINT = "Fix that line of the recipe; `cloudtune init` writes a commented example."


class _Refused(yaml.MarkedYAMLError):
    """A limit or rule of ours, raised where PyYAML raises its own errors, with the node's position."""

    def __init__(self, mark, problem: str):
        super().__init__(problem=problem, problem_mark=mark)


class _BudgetLoader(yaml.SafeLoader):
    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0
        self._aliases = 0
        self._open_anchors: set[str] = set()
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if event.anchor in self._open_anchors:
                raise _Refused(event.start_mark, f"the alias *{event.anchor} refers to the collection it is in "
                                                 "(a recursive alias)")
            if self._aliases > MAX_ALIASES:
                raise _Refused(event.start_mark, f"more than {MAX_ALIASES} aliases (*name) in one recipe")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)
        self._count(node)
        return node

    def _count(self, node: Node) -> None:
        # Children are complete before their parent, and an alias is its anchor's finished node, so
        # this sums sizes already known: linear in the text, however much the aliases expand.
        if isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if size > MAX_VALUES:
            raise _Refused(node.start_mark, f"expands to more than {MAX_VALUES:,} values (aliases that repeat "
                                            "aliases)")
        self._sizes[id(node)] = size

    def construct_object(self, node, deep=False):
        if isinstance(node, ScalarNode) and node.tag in NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(node.start_mark, f"a number {len(node.value):,} characters long; no setting takes one "
                                            f"over {MAX_NUMBER_CHARS}")
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. `!!int abc`, `!!float x`, `!!timestamp 99`
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(node.start_mark, f"this value cannot be read as {tag} ({type(exc).__name__})") from None


def load(text: str, path: Path) -> tuple[Any, dict[tuple, int]]:
    """The recipe's data and, for error messages, the line of each key path."""
    try:
        loader = _BudgetLoader(text)  # the reader refuses NUL and other unprintable characters here
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise CloudtuneError(f"{path}:{line}: the recipe holds a character YAML does not allow "
                             f"(U+{exc.character:04X}).", HINT) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        lines = _check_tree(root)
        return loader.construct_document(root), lines
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except RecursionError:  # the depth budget should make this unreachable; a traceback must stay so
        raise CloudtuneError(f"{path}: nested too deeply to read.", HINT) from None
    finally:
        loader.dispose()


def _yaml_error(path: Path, exc: yaml.YAMLError) -> CloudtuneError:
    # Never str(exc): PyYAML appends the offending line itself, which may be a secret or 10 MB long.
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "cannot be parsed"
    prefix = "" if isinstance(exc, _Refused) else "not valid YAML: "
    return CloudtuneError(f"{where}: {prefix}{problem}.",
                          HINT if isinstance(exc, _Refused) else
                          "Check indentation and quoting on that line (values with ':' need quotes).")


def _check_tree(root: Node) -> dict[tuple, int]:
    """Refuse duplicate keys, non-scalar keys and unprintable text; map key paths to lines.

    Each node is visited once: a node an alias repeats is indexed where it first appears, and
    the alias's own key gives the line for anything under it."""
    lines: dict[tuple, int] = {}
    seen: set[int] = set()
    stack: list[tuple[Node, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            stack += _mapping_children(node, path, lines)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault(path + (i,), item.start_mark.line + 1)
                stack.append((item, path + (i,)))
        else:
            _check_text(node, path)
    return lines


def _mapping_children(node: MappingNode, path: tuple, lines: dict[tuple, int]) -> list[tuple[Node, tuple]]:
    first_line: dict[str, int] = {}
    children: list[tuple[Node, tuple]] = []
    for key, value in node.value:
        if not isinstance(key, ScalarNode):
            raise _Refused(key.start_mark, "a key must be a plain name, not a list or mapping")
        if key.tag == MERGE_TAG:  # `<<: *base` merges keys that the mapping's own keys may override
            children.append((value, path))
            continue
        _check_text(key, path)
        line = key.start_mark.line + 1
        if key.value in first_line:
            where = ".".join(map(str, path + (key.value,)))
            raise _Refused(key.start_mark, f"{where}: the key '{key.value}' appears twice in one mapping, on lines "
                                           f"{first_line[key.value]} and {line}; keep one of them")
        first_line[key.value] = line
        lines[path + (key.value,)] = line
        children.append((value, path + (key.value,)))
    return children


def _check_text(node: ScalarNode, path: tuple) -> None:
    problem = text_problem(node.value)
    if problem:
        field = ".".join(map(str, path)) or "(top level)"
        raise _Refused(node.start_mark, f"{field}: the text {problem}")
