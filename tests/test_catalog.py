"""GPU names, and offers read through SkyPilot's own catalog API offline from the bundled snapshot.

Everything that imports sky runs in a subprocess whose HOME is a fresh directory: SkyPilot fixes
its catalog directory when it is imported, and no test may touch the real ~/.sky.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from cloudtune.errors import CloudtuneError
from cloudtune.planning.gpus import canonical_gpu, match_gpus
from cloudtune.planning.sky_catalog import SEED_RECORD, SNAPSHOT_DIR, bundled_clouds, snapshot_date

from .conftest import cli, sky_env


@pytest.mark.parametrize("spelling,canonical", [
    ("A10", "A10"), ("a10g", "A10G"), ("NVIDIA A10G", "A10G"), ("A100", "A100"), ("A100-40GB", "A100"),
    ("A100-80GB", "A100-80GB"), ("A100-80GB-SXM", "A100-80GB"), ("a100 80gb", "A100-80GB"), ("H100", "H100"),
    ("H100-SXM", "H100"), ("H100-80GB", "H100"), ("H100-NVLINK", "H100"), ("H100-MEGA", "H100"),
    ("H100-PCIe", "H100-PCIE"), ("H100-NVL", "H100-NVL"), ("H200-SXM", "H200"), ("RTX 4090", "RTX4090"),
    ("4090", "RTX4090"), ("NVIDIA GeForce RTX 3090", "RTX3090"), ("RTXA6000", "A6000"), ("A6000", "A6000"),
    ("RTX 6000 Ada", "RTX6000-Ada"), ("RTX6000", "RTX6000"), ("V100-32GB", "V100-32GB"), ("Tesla T4", "T4"),
    ("L40S", "L40S"), ("L40", "L40"), ("L4", "L4"), ("RTXPRO6000S", "RTXPRO6000"), ("MI300X", "MI300X"),
    ("RTXA5000", "RTXA5000"), ("NVIDIA RTX A4000", "RTXA4000"), ("RTX2000-Ada", "RTX2000-Ada"),
    ("RTXPRO5000", "RTXPRO5000"), ("RTXPRO6000-WK", "RTXPRO6000"),
])
def test_gpu_spellings_normalise(spelling, canonical):
    assert canonical_gpu(spelling) == canonical


def test_the_instance_type_tells_h100_variants_apart():
    assert canonical_gpu("H100", "gpu_1x_h100_pcie") == "H100-PCIE"  # Lambda
    assert canonical_gpu("H100", "1x-H100_NVL-32-65536") == "H100-NVL"  # Vast
    assert canonical_gpu("H100-NVLINK", "H100_NVLINK_80GB::8") == "H100"  # Fluidstack's SXM boards
    assert canonical_gpu("H100", "1x_H100_SECURE") == "H100-PCIE"  # RunPod (its SXM card is H100-SXM)
    assert canonical_gpu("H100-SXM", "8x_H100-SXM_SECURE") == "H100"


def test_a_family_name_matches_every_variant_and_says_so():
    a10 = match_gpus("A10")
    assert a10.names == {"A10", "A10G"} and "A10G" in a10.note
    assert match_gpus("a10g").names == {"A10G"} and match_gpus("a10g").note is None
    assert match_gpus("A100").names == {"A100", "A100-80GB"}
    assert match_gpus("A100-40GB").names == {"A100"}
    assert match_gpus("A100-80GB").names == {"A100-80GB"}
    assert match_gpus("H100").names == {"H100", "H100-PCIE", "H100-NVL"}
    assert match_gpus("H100-SXM").names == {"H100"}
    assert match_gpus("L40").names == {"L40"}  # the L40S is another card, not a variant


def test_unknown_and_unsupported_gpus_are_clear_errors():
    with pytest.raises(CloudtuneError) as unknown:
        match_gpus("A1000")
    assert "no GPU of that name" in unknown.value.message and "A100" in unknown.value.hint
    with pytest.raises(CloudtuneError) as old:
        match_gpus("K80")
    assert "tensor cores" in old.value.message


def test_offers_are_read_through_skypilot_offline_then_from_the_cache(tmp_path, ct_home):
    home = tmp_path / "home"
    home.mkdir()
    env = sky_env(home, ct_home)
    first = cli(env, "gpus", "--json")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert not data["problems"] and not data["from_cache"]
    assert data["snapshot_date"] == snapshot_date() != "unknown date"
    assert {o["cloud"] for o in data["offers"]} == set(bundled_clouds())
    assert {"lambda", "vast", "runpod", "aws", "gcp", "azure"} <= set(bundled_clouds())
    assert all(s == {"origin": "bundled snapshot", "date": snapshot_date()} for s in data["sources"].values())
    prices = [o["usd_per_hour"] for o in data["offers"]]
    assert prices == sorted(prices)
    # SkyPilot prices a GCP GPU as accelerator + host VM; cloudtune shows SkyPilot's sum
    gcp_a100 = next(o for o in data["offers"] if o["cloud"] == "gcp" and o["instance_type"] == "a2-highgpu-1g")
    assert gcp_a100["gpu"] == "A100" and gcp_a100["usd_per_hour"] > 0.81406  # more than the host alone
    # each catalog row keeps the name SkyPilot uses, while `gpu` is cloudtune's normalised one
    runpod_h100 = next(o for o in data["offers"] if o["instance_type"] == "1x_H100-SXM_SECURE")
    assert (runpod_h100["gpu"], runpod_h100["accelerator"]) == ("H100", "H100-SXM")
    assert "K80" in data["skipped"]  # old GPUs are listed as skipped, never planned on

    catalogs = home / ".sky" / "catalogs" / "v8"
    for cloud in bundled_clouds():
        assert (catalogs / cloud / "vms.csv").read_bytes() == (SNAPSHOT_DIR / cloud / "vms.csv").read_bytes()
    assert not list(catalogs.glob(".meta/**/*.md5"))  # without an md5 SkyPilot never re-downloads them

    second = cli(env, "gpus", "--json", "--gpu", "A10")
    again = json.loads(second.stdout)
    assert again["from_cache"] and {o["gpu"] for o in again["offers"]} == {"A10", "A10G"} and again["note"]
    # a cached read does not even import SkyPilot
    probe = subprocess.run([sys.executable, "-c", "import sys; from cloudtune.planning.offers import load_offers; "
                            "c = load_offers(); print(c.from_cache, 'sky' in sys.modules, len(c.offers))"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["True", "False", str(len(data["offers"]))]
    # a catalog file that changes invalidates the cache
    lambda_csv = catalogs / "lambda" / "vms.csv"
    os.utime(lambda_csv, ns=(lambda_csv.stat().st_atime_ns, lambda_csv.stat().st_mtime_ns + 10**9))
    assert not json.loads(cli(env, "gpus", "--json", "--cloud", "lambda").stdout)["from_cache"]


def test_a_catalog_skypilot_already_has_is_used_not_overwritten(tmp_path, ct_home):
    home = tmp_path / "home"
    catalogs = home / ".sky" / "catalogs" / "v8"
    (catalogs / "lambda").mkdir(parents=True)
    text = (SNAPSHOT_DIR / "lambda" / "vms.csv").read_text()
    (catalogs / "lambda" / "vms.csv").write_text(text.replace("gpu_1x_a10,A10,1.0,30.0,200.0,1.29",
                                                              "gpu_1x_a10,A10,1.0,30.0,200.0,0.55"))
    assert "0.55" in (catalogs / "lambda" / "vms.csv").read_text()
    result = cli(sky_env(home, ct_home), "gpus", "--json", "--cloud", "lambda", "--gpu", "A10")
    data = json.loads(result.stdout)
    assert [o["usd_per_hour"] for o in data["offers"] if o["instance_type"] == "gpu_1x_a10"] == [0.55]
    assert data["sources"]["lambda"]["origin"] == "SkyPilot catalog"
    assert "0.55" in (catalogs / "lambda" / "vms.csv").read_text()


def test_a_newer_bundled_snapshot_replaces_an_untouched_older_seed_and_the_table_lists_it(tmp_path, ct_home):
    home = tmp_path / "home"
    home.mkdir()
    env = sky_env(home, ct_home)
    assert cli(env, "gpus", "--json", "--cloud", "lambda").returncode == 0
    catalogs = home / ".sky" / "catalogs" / "v8"
    record_path = catalogs / SEED_RECORD
    # as an older cloudtune would have left them: an older seeded file, and one SkyPilot downloaded
    older = (SNAPSHOT_DIR / "lambda" / "vms.csv").read_text().replace("gpu_1x_a10,A10,1.0,30.0,200.0,1.29",
                                                                      "gpu_1x_a10,A10,1.0,30.0,200.0,0.99")
    (catalogs / "lambda" / "vms.csv").write_text(older)
    record = json.loads(record_path.read_text())
    record["lambda/vms.csv"]["sha256"] = hashlib.sha256(older.encode()).hexdigest()
    record_path.write_text(json.dumps(record))
    (catalogs / "vast").mkdir(exist_ok=True)
    downloaded = (SNAPSHOT_DIR / "vast" / "vms.csv").read_text() + "\n"
    (catalogs / "vast" / "vms.csv").write_text(downloaded)

    table = cli({**env, "COLUMNS": "200"}, "gpus", "--gpu", "A10", "--cloud", "lambda", "--cloud", "vast")
    assert table.returncode == 0, table.stderr
    assert "gpu_1x_a10" in table.stdout and "1.29" in table.stdout and "0.99" not in table.stdout
    assert (catalogs / "lambda" / "vms.csv").read_bytes() == (SNAPSHOT_DIR / "lambda" / "vms.csv").read_bytes()
    assert (catalogs / "vast" / "vms.csv").read_text() == downloaded, "SkyPilot's own download stays"


def test_refresh_without_network_changes_nothing(tmp_path, ct_home):
    home = tmp_path / "home"
    home.mkdir()
    code = ("from cloudtune.planning.offers import refresh_catalogs; "
            "print([(r.cloud, r.ok, r.message) for r in refresh_catalogs(['lambda'], probe_host='catalog.invalid')])")
    result = subprocess.run([sys.executable, "-c", code], env=sky_env(home, ct_home), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "[('lambda', False, 'no network')]", result.stderr
    seeded = home / ".sky" / "catalogs" / "v8" / "lambda" / "vms.csv"
    assert seeded.read_bytes() == (SNAPSHOT_DIR / "lambda" / "vms.csv").read_bytes()
