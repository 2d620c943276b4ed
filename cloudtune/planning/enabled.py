"""Which clouds SkyPilot can rent on here, as last found: `cloudtune check` and every launch ask SkyPilot
(seconds: its API server runs the check), and `cost`, `gpus` and `run --dry-run` only read what they
found, to mark the offers on clouds the user has no account set up for.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..paths import home
from .jsonfile import read_json, write_json

ENABLED_FILE = "enabled-clouds.json"


@dataclass(frozen=True)
class EnabledClouds:
    enabled: frozenset[str]
    checked_at: float

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.checked_at))

    def off(self, clouds: Iterable[str]) -> list[str]:
        """Those of `clouds` SkyPilot could not rent on when last checked."""
        return sorted({cloud for cloud in clouds if cloud.lower() not in self.enabled})

    def as_dict(self) -> dict:
        return {"enabled": sorted(self.enabled), "checked": self.day}


def remember(enabled: Iterable[str]) -> None:
    path = home() / "cache" / ENABLED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"enabled": sorted({cloud.lower() for cloud in enabled}), "checked_at": time.time()})


def last_checked() -> EnabledClouds | None:
    """What the last check found; None when no check ran here yet."""
    found = read_json(home() / "cache" / ENABLED_FILE)
    if not isinstance(found, dict) or not isinstance(found.get("enabled"), list):
        return None
    return EnabledClouds(frozenset(str(cloud) for cloud in found["enabled"]), float(found.get("checked_at") or 0))


def describe(known: EnabledClouds | None, clouds: Iterable[str]) -> str | None:
    """The note under a list of offers on `clouds`: which of them cannot be rented, or that nobody checked."""
    clouds = sorted(set(clouds))
    if not clouds or clouds == ["local"]:
        return None
    if known is None:
        return "which of these clouds you can rent on is not known yet: `cloudtune check` asks SkyPilot"
    off = known.off(clouds)
    if not off:
        return None
    return (f"† not enabled here (`cloudtune check` of {known.day}): {', '.join(off)}; renting there needs "
            "that cloud's credentials and extra")
