"""Which of a list of requirements this interpreter lacks (environment markers evaluated here).

    python -m cloudtune.remote.missing_requirements REQUIREMENTS_JSON [MARK]

Prints MARK followed by the JSON list of the requirements that are not installed, or installed at a
version outside their specifier. Uses `packaging` (or pip's vendored copy) when there is one; without
either, only the names are checked. Standard library only, so a backend can ship this file to a machine
(or into a container image) before cloudtune is installed there.
"""
from __future__ import annotations

import json
import re
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None


def _lacks(text: str) -> bool:
    if Requirement is None:
        name, requirement = re.split(r"[\s\[<>=!~;(]", text.strip(), maxsplit=1)[0], None
    else:
        requirement = Requirement(text)
        name = requirement.name
        if requirement.marker is not None and not requirement.marker.evaluate():
            return False  # not meant for this machine
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return True
    return requirement is not None and not requirement.specifier.contains(version, prereleases=True)


def missing(requirements: list[str]) -> list[str]:
    """The requirements this interpreter does not satisfy, in their given order."""
    return [text for text in requirements if _lacks(text)]


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: missing_requirements REQUIREMENTS_JSON [MARK]", file=sys.stderr)
        return 2
    mark = argv[1] if len(argv) == 2 else ""
    print(mark + json.dumps(missing(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
