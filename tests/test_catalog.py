"""GPU names, and offers read through SkyPilot's own catalog API: from SkyPilot's own catalog files
where it has them, from the bundled snapshot otherwise, never writing into SkyPilot's folder.

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
from cloudtune.planning.offers import BUNDLE
from cloudtune.planning.sky_catalog import OLD_SEED_RECORD, SNAPSHOT_DIR, bundled_clouds, snapshot_date

from .conftest import REPO, cli, sky_env

GUANACO = str(REPO / "tasks" / "llama2-7b-qlora-guanaco.yaml")


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


def test_the_bundled_offers_are_what_skypilot_reads_of_the_snapshot(tmp_path, ct_home):
    """offers.json ships beside the snapshot so a fresh install never imports sky to price; it must be
    exactly SkyPilot's reading of the snapshot files (scripts/build_offers_bundle.py rewrites it)."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("import json; from cloudtune.planning import offers, sky_catalog; "
            "print(json.dumps({'skypilot': sky_catalog.skypilot_version(), "
            "'clouds': offers.read_through_skypilot(sky_catalog.bundled_clouds())}))")
    result = subprocess.run([sys.executable, "-c", code], env=sky_env(home, ct_home), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    now = json.loads(result.stdout)
    bundle = json.loads(BUNDLE.read_text())
    stale = "stale: run scripts/build_offers_bundle.py"
    assert bundle["skypilot"] == now["skypilot"], stale
    assert bundle["files"] == {cloud: hashlib.sha256((SNAPSHOT_DIR / cloud / "vms.csv").read_bytes()).hexdigest()
                               for cloud in bundled_clouds()}, stale
    assert bundle["clouds"] == now["clouds"], stale


def test_offers_come_from_the_bundle_then_skypilots_own_files_then_the_cache(tmp_path, ct_home):
    home = tmp_path / "home"
    home.mkdir()
    env = sky_env(home, ct_home)
    first = cli(env, "gpus", "--json", "--top", "1000")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert not data["problems"] and data["from_cache"]  # the bundle: no SkyPilot import in a fresh HOME
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
    assert not (home / ".sky" / "catalogs").exists(), "SkyPilot's catalog folder is SkyPilot's to fill"

    second = cli(env, "gpus", "--json", "--gpu", "A10")
    again = json.loads(second.stdout)
    assert again["from_cache"] and {o["gpu"] for o in again["offers"]} == {"A10", "A10G"} and again["note"]

    # a catalog file SkyPilot fetched (of several regions) is read through SkyPilot once, and its prices win
    catalogs = home / ".sky" / "catalogs" / "v8"
    (catalogs / "lambda").mkdir(parents=True)
    text = (SNAPSHOT_DIR / "lambda" / "vms.csv").read_text()
    a10 = next(row for row in text.splitlines() if row.startswith("gpu_1x_a10,"))
    west = a10.replace(",1.29,us-east-1,", ",0.77,us-west-1,")
    south = a10.replace(",1.29,us-east-1,", ",2.0,us-south-1,")
    (catalogs / "lambda" / "vms.csv").write_text(text.rstrip("\n") + f"\n{west}\n{south}\n")
    fetched = json.loads(cli(env, "gpus", "--json", "--cloud", "lambda").stdout)
    assert not fetched["from_cache"] and fetched["sources"]["lambda"]["origin"] == "SkyPilot catalog"
    # then every filter, with a region or without, is served from that one cache without importing sky
    code = ("import sys; from cloudtune.planning.offers import load_offers; "
            "a10 = lambda c: [(o.region, o.price_per_hour) for o in c.offers if o.instance_type == 'gpu_1x_a10']; "
            "c = [load_offers(['lambda'], region) for region in (None, 'us-east', 'us-south', None)]; "
            "print([x.from_cache for x in c], 'sky' in sys.modules, [a10(x) for x in c], len(c[2].offers))")
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == ("[True, True, True, True] False [[('us-west-1', 0.77)], [('us-east-1', 1.29)], "
                                    "[('us-south-1', 2.0)], [('us-west-1', 0.77)]] 1")


def _files(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cost_and_dry_run_read_skypilots_own_catalog_where_it_has_one_and_write_nothing_there(tmp_path, ct_home):
    """SkyPilot holds a fetched Lambda catalog (with the .md5 of its own downloads), nothing else: Lambda
    is priced from it, every other cloud from the snapshot, the output says which with its date, and
    neither `cost` nor `run --dry-run` adds, changes or touches a file in SkyPilot's folder."""
    home = tmp_path / "home"
    sky_dir = home / ".sky"
    catalogs = sky_dir / "catalogs" / "v8"
    (catalogs / "lambda").mkdir(parents=True)
    (catalogs / ".meta" / "lambda").mkdir(parents=True)
    text = (SNAPSHOT_DIR / "lambda" / "vms.csv").read_text().replace("gpu_1x_a10,A10,1.0,30.0,200.0,1.29",
                                                                     "gpu_1x_a10,A10,1.0,30.0,200.0,0.55")
    (catalogs / "lambda" / "vms.csv").write_text(text)
    (catalogs / ".meta" / "lambda" / "vms.csv.md5").write_text(hashlib.md5(text.encode()).hexdigest())
    fetched_at = 1795000000  # 2026-11-18 UTC
    os.utime(catalogs / "lambda" / "vms.csv", (fetched_at, fetched_at))
    before = _files(catalogs)
    env = {**sky_env(home, ct_home), "HF_TOKEN": "hf_" + "catalogTestValue" * 2}
    env.pop("CLOUDTUNE_BACKEND", None)  # the default backend: SkyPilot

    data = json.loads(cli(env, "cost", "--json", "--gpu", "A10", GUANACO).stdout)
    sources = data["catalog"]["sources"]
    assert sources["lambda"] == {"origin": "SkyPilot catalog", "date": "2026-11-18"}
    assert sources["aws"] == {"origin": "bundled snapshot", "date": snapshot_date()}
    assert data["chosen"]["offer"]["instance_type"] == "gpu_1x_a10" and data["chosen"]["usd_per_hour"] == 0.55
    said = f"prices: SkyPilot catalog fetched lambda 2026-11-18; others bundled snapshot of {snapshot_date()}"
    table = cli(env, "cost", "--gpu", "A10", GUANACO)
    assert table.returncode == 0 and said in " ".join(table.stdout.split()), table.stdout + table.stderr
    dry = cli(env, "run", "--dry-run", "--gpu", "A10", GUANACO)
    assert dry.returncode == 0, dry.stderr
    assert said in " ".join(dry.stdout.split()) and "gpu_1x_a10" in dry.stdout
    assert "hyperbolic left out: SkyPilot cannot do docker_image" in " ".join(dry.stdout.split())
    assert _files(catalogs) == before
    assert sorted(p.name for p in sky_dir.iterdir() if p.name.startswith("catalogs")) == ["catalogs"]


def test_offers_on_clouds_where_skypilot_cannot_run_the_plan_are_left_out_saying_why(tmp_path, ct_home):
    """Hyperbolic runs no Docker image and cannot tear itself down; RunPod and Vast mount no bucket, which
    a spot run keeps its checkpoints on. SkyPilot's own feature table says so, read once with the offers."""
    home = tmp_path / "home"
    home.mkdir()
    env = sky_env(home, ct_home)
    plan = json.loads(cli(env, "cost", "--json", "--top", "1000", GUANACO).stdout)
    assert "docker_image" in plan["left_out"]["hyperbolic"] and "autodown" in plan["left_out"]["hyperbolic"]
    assert {e["offer"]["cloud"] for e in plan["estimates"]} >= {"aws", "lambda", "runpod"}
    assert "hyperbolic" not in {e["offer"]["cloud"] for e in plan["estimates"]}
    spot = json.loads(cli(env, "cost", "--json", "--spot", "--top", "1000", GUANACO).stdout)
    assert {"runpod", "vast", "hyperbolic"} <= set(spot["left_out"]) and "aws" not in spot["left_out"]
    assert "storage_mounting" in spot["left_out"]["runpod"]
    assert not {"runpod", "vast"} & {e["offer"]["cloud"] for e in spot["estimates"]}
    only = cli(env, "cost", "--cloud", "hyperbolic", GUANACO)
    assert only.returncode == 2 and "SkyPilot cannot run this plan on hyperbolic" in only.stderr
    assert "docker_image (Docker images not supported)" in " ".join(only.stderr.split())
    # all of it from the cache: the table was read with the offers, and sky is not imported again
    probe = subprocess.run([sys.executable, "-c", "import sys; from cloudtune.planning.offers import load_offers; "
                            "c = load_offers(); print(c.from_cache, 'sky' in sys.modules, "
                            "sorted(c.unsupported['hyperbolic']['on-demand']))"],
                           env=env, capture_output=True, text=True, timeout=120)
    lacking = "['AUTODOWN', 'DOCKER_IMAGE', 'MULTI_NODE', 'SPOT_INSTANCE', 'STORAGE_MOUNTING']"
    assert probe.stdout.strip().split(maxsplit=2) == ["True", "False", lacking]


def test_what_an_older_cloudtune_seeded_into_skypilots_folder_is_removed_unless_changed(tmp_path, ct_home):
    """cloudtune 0.1 copied the snapshot into SkyPilot's folder without .md5 files, so SkyPilot never
    refreshed them: those copies go (SkyPilot then fetches its full catalogs), edited ones stay."""
    home = tmp_path / "home"
    catalogs = home / ".sky" / "catalogs" / "v8"
    record = {}
    for cloud in ("lambda", "vast"):
        (catalogs / cloud).mkdir(parents=True)
        (catalogs / cloud / "vms.csv").write_bytes((SNAPSHOT_DIR / cloud / "vms.csv").read_bytes())
        record[f"{cloud}/vms.csv"] = {"sha256": hashlib.sha256((SNAPSHOT_DIR / cloud / "vms.csv").read_bytes())
                                      .hexdigest(), "snapshot_date": "2026-01-01"}
    edited = (catalogs / "vast" / "vms.csv").read_text() + "\n"
    (catalogs / "vast" / "vms.csv").write_text(edited)
    (catalogs / OLD_SEED_RECORD).write_text(json.dumps(record))

    result = cli(sky_env(home, ct_home), "gpus", "--json", "--cloud", "lambda", "--cloud", "vast")
    assert result.returncode == 0, result.stderr
    assert not (catalogs / "lambda" / "vms.csv").exists() and not (catalogs / OLD_SEED_RECORD).exists()
    assert (catalogs / "vast" / "vms.csv").read_text() == edited, "a file changed since it was seeded stays"
    sources = json.loads(result.stdout)["sources"]
    assert sources["lambda"]["origin"] == "bundled snapshot" and sources["vast"]["origin"] == "SkyPilot catalog"


def test_refresh_without_network_changes_nothing(tmp_path, ct_home):
    home = tmp_path / "home"
    home.mkdir()
    code = ("from cloudtune.planning.offers import refresh_catalogs; "
            "print([(r.cloud, r.ok, r.message) for r in refresh_catalogs(['lambda'], probe_host='catalog.invalid')])")
    result = subprocess.run([sys.executable, "-c", code], env=sky_env(home, ct_home), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "[('lambda', False, 'no network')]", result.stderr
    assert not (home / ".sky" / "catalogs").exists()
