"""Scale-out, planning and presentation: how many GPUs per machine and how many machines a run rents,
how they share the work (DDP or FSDP), what that costs per run, and how status, the receipt and the
report show the world a run trained on.

Plans get their offers handed in (or the catalog read is replaced), so nothing here imports SkyPilot;
the SkyPilot task for several machines is validated by SkyPilot in test_skypilot.py.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import replace

import pytest
from click.testing import CliRunner
from rich.console import Console

from cloudtune import receipt as receipts
from cloudtune.cli import cli
from cloudtune.datasets import inspect_dataset
from cloudtune.errors import CloudtuneError
from cloudtune.ledger import Ledger
from cloudtune.lifecycle import plan as lifecycle_plan
from cloudtune.planning import planner
from cloudtune.planning.calibration import scaling_efficiency
from cloudtune.planning.gpus import usable_gib
from cloudtune.planning.memory import GIB, TrainSetup, choose_parallelism, memory_peak, required_bytes, sharded
from cloudtune.planning.models import resolve_model
from cloudtune.planning.offers import Catalog, Offer
from cloudtune.planning.planner import make_plan
from cloudtune.recipe import load_recipe
from cloudtune.render import cost_table, receipt
from cloudtune.report import receipt_rows

from .conftest import demo_recipe_text, write_recipe
from .test_cost import recipe_file

A10G = [Offer("aws", "us-east-1", "g5.xlarge", "A10G", 1, 24, 1.01, None, "A10G"),
        Offer("aws", "us-east-1", "g5.12xlarge", "A10G", 4, 24, 5.67, None, "A10G"),
        Offer("aws", "us-east-1", "g5.48xlarge", "A10G", 8, 24, 16.29, None, "A10G")]
H100 = [Offer("lambda", "us-east-1", "gpu_1x_h100_sxm5", "H100", 1, 80, 2.99, None, "H100"),
        Offer("lambda", "us-east-1", "gpu_2x_h100_sxm5", "H100", 2, 80, 5.98, None, "H100"),
        Offer("lambda", "us-east-1", "gpu_8x_h100_sxm5", "H100", 8, 80, 23.92, None, "H100")]
LONG = {"epochs": 60}  # training, not provisioning, decides the price


def plan_of(path, offers, **kwargs):
    recipe = load_recipe(path)
    return recipe, make_plan(recipe, inspect_dataset(recipe), offers=offers, **kwargs)


def shown(table, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_a_full_fine_tune_of_7b_on_24_gb_cards_shards_over_several(tmp_path):
    full = {"method": "full", "training": {"optimizer": "adamw"}}
    recipe, plan = plan_of(recipe_file(tmp_path, **full), A10G)
    by_count = {e.offer.gpu_count: e for e in plan.estimates}
    assert not by_count[1].fits and "needs" in by_count[1].why
    chosen = plan.chosen
    assert chosen is by_count[4] and chosen.parallelism == "fsdp" and chosen.world_size == 4  # ×8 costs more
    assert "on 4 GPUs by fsdp" in chosen.why and "assumed, not measured" in chosen.why
    # what each GPU holds: the one-GPU model's weights, gradients and optimizer state over 4, activations whole
    shape, alone = resolve_model(recipe).shape, TrainSetup.from_recipe(recipe)
    tokens = chosen.micro_batch_size * 2048
    one = memory_peak(shape, alone, tokens, chosen.checkpointed_layers)
    four = memory_peak(shape, sharded(alone, "fsdp", 4), tokens, chosen.checkpointed_layers)
    assert four.trainable == pytest.approx(one.trainable / 4) and four.activations == one.activations
    assert one.weights / 4 < four.weights < one.weights / 2  # the shard, plus the two layers gathered whole
    assert four.gib == pytest.approx(chosen.peak_gib, abs=0.01)
    assert required_bytes(four) <= usable_gib(chosen.offer) * GIB < required_bytes(one)
    # DDP keeps the one-GPU model on each card: forced, nothing fits
    _, ddp = plan_of(recipe_file(tmp_path, method="full", training={"optimizer": "adamw", "parallelism": "ddp"}), A10G)
    assert ddp.chosen is None and all(e.parallelism == "ddp" for e in ddp.estimates)


def test_lora_fits_one_gpu_and_one_gpu_wins_on_dollars(tmp_path):
    _, plan = plan_of(recipe_file(tmp_path, training=LONG), H100)
    chosen, fastest = plan.chosen, plan.fastest
    assert chosen.world_size == 1 and all(e.fits and e.parallelism == "ddp" for e in plan.estimates)
    assert [e.world_size for e in plan.estimates] == [1, 2, 8]  # by dollars per run: scaling is below 1
    assert fastest.world_size == 8 and fastest.hours_high < chosen.hours_high and fastest.cost_low > chosen.cost_high
    eight = plan.estimates[-1]
    assert eight.tokens_per_s_high == pytest.approx(8 * eight.scaling_high * chosen.tokens_per_s_high, rel=0.01)
    note = next(n for n in plan.notes if n.startswith("fastest: H100×8 on lambda"))
    assert re.search(r": \d\.\d× faster than the cheapest \(H100×1 on lambda\), \d\.\d× the dollars$", note), note
    assert any("scaling assumed, not measured" in n for n in plan.notes)
    assert not any("one GPU per machine" in n for n in plan.notes)


def test_a_machine_whose_gpus_cost_less_each_is_cheaper_per_run(tmp_path):
    bulk = [H100[0], replace(H100[1], price_per_hour=3.5)]  # $1.75 a GPU against $2.99
    _, plan = plan_of(recipe_file(tmp_path, training={"epochs": 200}), bulk)
    assert plan.chosen.world_size == 2 and plan.chosen.cost_high < plan.estimates[1].cost_high


@pytest.mark.parametrize(("sections", "reason"), [
    ({"method": "8bit"}, "method 8bit cannot be sharded with FSDP"),
    ({"method": "fp8"}, "method fp8 cannot be sharded with FSDP"),
    ({"method": "full", "training": {"optimizer": "adamw_8bit"}}, "optimizer adamw_8bit (bitsandbytes) cannot step"),
    ({"method": "qlora", "training": {"optimizer": "paged_adamw_8bit"}}, "optimizer paged_adamw_8bit"),
])
def test_what_fsdp_cannot_shard_is_refused_with_the_recipe_and_never_chosen(tmp_path, sections, reason):
    """bitsandbytes' 8-bit optimizers raise on FSDP's DTensor parameters (bench/fsdp_one_gpu.py, H200), and
    8-bit weights are no dtype FSDP can split: an explicit fsdp is refused before anything starts, auto
    keeps to ddp, and offers only FSDP could fit are left out, saying why."""
    explicit = {**sections, "training": {**sections.get("training", {}), "parallelism": "fsdp"}}
    with pytest.raises(CloudtuneError, match=re.escape(reason)) as refused:
        load_recipe(recipe_file(tmp_path, **explicit))
    assert "training.parallelism" in str(refused.value) and "Use ddp" in str(refused.value)

    recipe = load_recipe(recipe_file(tmp_path, **sections))
    assert recipe.fsdp_refusal and reason in recipe.fsdp_refusal
    shape, setup = resolve_model(recipe).shape, TrainSetup.from_recipe(recipe)
    assert choose_parallelism("auto", shape, setup, 4, 1 * GIB, 2048, shardable=False) == "ddp"
    if sections["method"] == "full":  # 7B full does not fit one 24 GB card; sharding is what would have fit it
        _, plan = plan_of(recipe_file(tmp_path, **sections), A10G)
        assert all(e.parallelism == "ddp" and not e.fits for e in plan.estimates)
        several = [e for e in plan.estimates if e.world_size > 1]
        assert several and all(f"FSDP would share it out, but {reason}" in e.why for e in several)


def test_the_parallelism_rule_is_one_function(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, method="full", training={"optimizer": "adamw"}))
    shape, setup = resolve_model(recipe).shape, TrainSetup.from_recipe(recipe)
    small, big = 22 * GIB, 79 * GIB
    assert choose_parallelism("auto", shape, setup, 4, small, 2048) == "fsdp"
    assert choose_parallelism("auto", shape, setup, 4, big, 2048) == "ddp"
    assert choose_parallelism("auto", shape, setup, 1, small, 2048) == "ddp"  # one GPU: nothing to shard
    assert choose_parallelism("ddp", shape, setup, 4, small, 2048) == "ddp"  # the recipe's word stands
    assert choose_parallelism("fsdp", shape, setup, 4, big, 2048) == "fsdp"
    lora = TrainSetup.from_recipe(load_recipe(recipe_file(tmp_path)))
    assert choose_parallelism("auto", shape, lora, 2, small, 2048) == "ddp"


def test_scaling_is_a_stated_prior_until_a_measured_row_replaces_it():
    alone = scaling_efficiency("ddp", 1)
    assert (alone.low, alone.high) == (1.0, 1.0)
    ddp, fsdp = scaling_efficiency("ddp", 8), scaling_efficiency("fsdp", 8)
    assert not ddp.measured and ddp.source == "assumed, not measured"
    assert 0.8 <= ddp.low < ddp.high < 1 and fsdp.high <= ddp.high
    across = scaling_efficiency("ddp", 8, 2)
    assert across.high < ddp.low + 0.1 and across.low < ddp.low
    measured = {"measured": True, "parallelism": "ddp", "gpu": "H100", "method": "lora", "gpu_count": 8,
                "num_nodes": 1, "efficiency_low": 0.93, "efficiency_high": 0.96, "source": "bench run"}
    rows = (measured,)
    found = scaling_efficiency("ddp", 8, gpu="H100", method="lora", rows=rows)
    assert found.measured and (found.low, found.high) == (0.93, 0.96)
    with pytest.raises(StopIteration):  # another shape falls back to the priors, which these rows lack
        scaling_efficiency("ddp", 2, gpu="H100", method="lora", rows=rows)


def test_several_machines_price_every_one_and_scale_less(tmp_path):
    path = recipe_file(tmp_path, training=LONG, compute={"num_nodes": 2})
    _, plan = plan_of(path, [H100[2]])
    two = plan.chosen
    assert two.nodes == 2 and two.world_size == 16 and two.label == "2×H100×8"
    assert two.price_per_hour == pytest.approx(2 * 23.92)
    assert two.cost_high == pytest.approx(two.hours_high * two.price_per_hour, abs=0.05)
    (tmp_path / "one").mkdir()
    one_machine = plan_of(recipe_file(tmp_path / "one", training=LONG), [H100[2]])[1].chosen
    assert two.scaling_high < one_machine.scaling_high and two.hours_high < one_machine.hours_high
    text = shown(cost_table(plan, 5, 80))
    assert "2×H100×8 " in text and all(len(line) <= 80 for line in text.splitlines())
    assert "2×H100×8" in shown(cost_table(plan, 5, 120), 120) and " ddp " in shown(cost_table(plan, 5, 120), 120)


@pytest.fixture
def catalog(monkeypatch):
    """`cloudtune cost` in-process over these offers instead of SkyPilot's catalog."""
    offers = A10G + H100 + [Offer("lambda", "us-east-1", "gpu_1x_a10", "A10", 1, 24, 0.75, None, "A10")]
    monkeypatch.setattr(planner, "load_offers", lambda clouds, region: Catalog(
        offers=list(offers), snapshot_date="2026-11-23", sources={}))


def test_cost_takes_skypilots_name_and_count(tmp_path, catalog):
    path = recipe_file(tmp_path, method="qlora")
    eight = CliRunner().invoke(cli, ["cost", str(path), "--gpu", "H100:8", "--json"])
    assert eight.exit_code == 0, eight.output
    data = json.loads(eight.output)
    assert [(e["offer"]["gpu"], e["world_size"]) for e in data["estimates"]] == [("H100", 8)]
    assert data["chosen"]["usd_per_hour"] == 23.92
    one = CliRunner().invoke(cli, ["cost", str(path), "--gpu", "A10:1"], env={"COLUMNS": "80"})
    assert one.exit_code == 0, one.output
    rows = [line for line in one.output.splitlines() if "×" in line.split(" ")[0]]
    assert rows and {row.split()[0] for row in rows} == {"A10×1", "A10G×1"}
    assert "one GPU per machine" not in one.output and all(len(row) <= 80 for row in rows)
    every = CliRunner().invoke(cli, ["cost", str(path), "--gpu", "A10G"], env={"COLUMNS": "80"})
    assert {"A10G×1", "A10G×4", "A10G×8"} <= {line.split()[0] for line in every.output.splitlines() if line}


def test_backends_with_one_machine_refuse_several_before_anything_starts(tmp_path):
    text = demo_recipe_text(max_steps=3) + "compute:\n  num_nodes: 2\n"
    path = write_recipe(tmp_path, text)
    for args in (["--backend", "local"], ["--backend", "ssh", "--host", "nobody@127.0.0.1:1"]):
        refused = CliRunner().invoke(cli, ["run", str(path), *args])
        assert refused.exit_code == 2, refused.output
        message = " ".join(refused.output.split())
        assert "compute.num_nodes 2" in message and "trains on one machine" in message
        assert "--backend skypilot" in message and "Traceback" not in message
    assert Ledger().runs() == []  # no run was even recorded
    from cloudtune.backends.local import LocalBackend

    with pytest.raises(CloudtuneError, match="num_nodes 2"):
        lifecycle_plan(load_recipe(path), LocalBackend(), LocalBackend().events)


WORLD_RUN = {"world_size": 16, "nodes": 2, "parallelism": "fsdp", "tokens_per_s": 123456.0,
             "tokens_per_s_per_gpu": 7716.0}


@pytest.mark.parametrize("width", [80, 120])
def test_status_receipt_and_report_show_the_world_and_the_speed_per_gpu(tmp_path, width):
    out = tmp_path / "outputs" / "20261201-182042-43ea68"
    made = {"run_id": "20261201-182042-43ea68", "backend": "skypilot", "machine": "ct-20261201-182042-43ea68",
            "device": "NVIDIA H100 80GB HBM3", "wall_seconds": 4244.0, "train_seconds": 3900.0, "tokens": 481_000_000,
            "steps": 300, "final_loss": 1.46, "weights_dir": "adapter", "weights_path": str(out / "adapter"),
            "output_dir": str(out), **WORLD_RUN}
    ledger = Ledger()
    for run_id, fields in (("20261201-182042-43ea68", made), ("20261130-100000-aaaaaa", {"tokens": 1000,
                                                                                         "tokens_per_s": 950.0})):
        ledger.add_run(run_id, name="llama2-7b-qlora-guanaco", backend="skypilot")
        ledger.update_run(run_id, status="succeeded", **receipts.ledger_columns(fields))
    status = CliRunner().invoke(cli, ["status"], env={"COLUMNS": str(width)})
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    assert all(len(line) <= width for line in lines)
    first = next(i for i, line in enumerate(lines) if line.startswith("20261201-182042-43ea68 "))
    assert "16 (2×8)" in lines[first] and "123.5k" in lines[first] and "7.7k/GPU" in lines[first + 1]
    older = next(line for line in lines if line.startswith("20261130-100000-aaaaaa "))
    assert re.search(r" 1 +950 ", older), older  # a run.json from before scale-out: one GPU
    runs = {run["id"]: run for run in json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)}
    assert runs["20261201-182042-43ea68"]["meta"]["world_size"] == 16
    assert runs["20261201-182042-43ea68"]["meta"]["tokens_per_s_per_gpu"] == 7716.0

    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    receipt(console, made)
    text = console.export_text()
    assert "world size" in text and "16 (2×8), fsdp" in text and "123,456 total, 7,716 per GPU" in text
    assert all(len(line) <= width for line in text.splitlines() if str(out) not in line)
    one = {key: value for key, value in made.items() if key not in WORLD_RUN} | {"tokens_per_s": 1189.0}
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    receipt(console, one)
    text = console.export_text()
    assert re.search(r"world size +1\n", text) and re.search(r"tokens/s +1,189\n", text)
    assert ("world size", "16 (2×8), fsdp") in receipt_rows(made, [])
    assert ("tokens/s", "123,456 total, 7,716 per GPU") in receipt_rows(made, [])


def test_own_clusters_plan_one_gpu_unless_asked(tmp_path):
    """A Slurm cluster lists every count at $0; which it has shows only at launch, so one GPU per machine
    unless compute.gpu_count says more."""
    own = [Offer("slurm", "", "", "H100", count, 80, 0.0, None, "H100") for count in (1, 2, 4, 8)]
    _, plan = plan_of(recipe_file(tmp_path, method="qlora"), own)
    assert {e.world_size for e in plan.estimates} == {1}
    recipe = load_recipe(recipe_file(tmp_path, method="qlora", compute={"gpu_count": 4}))
    assert [e.world_size for e in make_plan(recipe, inspect_dataset(recipe), offers=own).estimates] == [4]


def test_clouds_where_skypilot_has_no_multi_node_are_left_out_of_a_run_on_several_machines():
    offers = [H100[2], Offer("runpod", "US", "8x_H100_SECURE", "H100", 8, 80, 21.5, None, "H100")]
    lacking = {"runpod": {"on-demand": {"MULTI_NODE": "Multi-node not supported yet."}}}
    assert planner.runnable_offers(offers, lacking, False, 1) == (offers, {})
    kept, left_out = planner.runnable_offers(offers, lacking, False, 2)
    assert kept == [H100[2]] and "multi_node (Multi-node not supported yet)" in left_out["runpod"]


def test_the_fastest_offer_is_weighed_against_the_cheapest():
    cheap = planner.Estimate(offer=H100[0], spot=False, fits=True, peak_gib=60, micro_batch_size=4,
                             gradient_checkpointing=False, tokens=10**8, tokens_per_s_low=1, tokens_per_s_high=1,
                             hours_low=3.8, hours_high=4.2, cost_low=9.8, cost_high=10.2)
    fast = replace(cheap, offer=H100[2], hours_low=0.9, hours_high=1.1, cost_low=11.0, cost_high=11.4)
    assert planner.speed_note([cheap, fast]) == ("fastest: H100×8 on lambda, 54m–1h06m: 4.0× faster than the "
                                                 "cheapest (H100×1 on lambda), +12 % dollars")
    assert planner.speed_note([cheap, replace(fast, hours_low=3.6, hours_high=3.9)]) is None  # not worth a line
    assert planner.speed_note([fast]) is None
    free = [replace(e, cost_low=0.0, cost_high=0.0) for e in (cheap, fast)]
    assert planner.speed_note(free).endswith("(H100×1 on lambda), the same dollars")
