#!/usr/bin/env python3
"""Write cloudtune/data/catalog/offers.json: the bundled snapshot's rows as SkyPilot reads them.

Run after scripts/build_catalog_snapshot.py or after the SkyPilot pin changes (tests/test_catalog.py
fails until then). Uses a scratch HOME, so SkyPilot reads the snapshot and nothing of ~/.sky.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "HOME": scratch, "CLOUDTUNE_HOME": f"{scratch}/ct", "PYTHONPATH": str(REPO),
               "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
        env.pop("SKY_RUNTIME_DIR", None)
        sys.exit(subprocess.run([sys.executable, "-c", "from cloudtune.planning.offers import write_bundle; "
                                 "print(write_bundle())"], env=env).returncode)
