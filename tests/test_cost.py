"""Plans: which offers fit, what the whole run costs, budgets, and `cloudtune cost` itself.

Plans built in-process get their offers handed in (no SkyPilot import here); the CLI tests run the
real `cloudtune` in a subprocess against the bundled snapshot, with HOME a fresh directory.
"""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.datasets import inspect_dataset
from cloudtune.errors import CloudtuneError
from cloudtune.planning.budget import check_budget
from cloudtune.planning.gpus import SPECS, usable_gib
from cloudtune.planning.memory import GIB, TrainSetup, memory_peak, required_bytes
from cloudtune.planning.models import resolve_model
from cloudtune.planning.offers import Offer
from cloudtune.planning.planner import fitted_recipe, make_plan
from cloudtune.recipe import load_recipe

from .conftest import cli as cli_process
from .conftest import demo_recipe_text, sky_env, write_recipe

OFFERS = [
    Offer("vast", "Texas, US", "1x-T4", "T4", 1, 16, 0.15),
    Offer("lambda", "us-east-1", "gpu_1x_a10", "A10", 1, 24, 0.75, None, "A10"),
    Offer("aws", "us-east-1", "g5.xlarge", "A10G", 1, 24, 1.01, 0.45, "A10G"),
    Offer("runpod", "US", "1x_A100-80GB_SECURE", "A100-80GB", 1, 80, 1.39, None, "A100-80GB"),
    Offer("lambda", "us-east-1", "gpu_1x_h100_sxm5", "H100", 1, 80, 2.99, None, "H100"),
    Offer("lambda", "us-east-1", "gpu_2x_h100_sxm5", "H100", 2, 80, 5.98, None, "H100"),
]


def guanaco_like(path: Path, rows: int = 400) -> Path:
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            words = int(min(900, max(10, rng.lognormvariate(math.log(250), 0.8))))
            answer = " ".join(rng.choice(["the", "model", "learns", "tokens", "fast", "and", "well"])
                              for _ in range(words))
            handle.write(json.dumps({"instruction": "Say something.", "output": answer}) + "\n")
    return path


def recipe_file(folder: Path, **sections) -> Path:
    guanaco_like(folder / "data.jsonl")
    data = {"model": "meta-llama/Llama-2-7b-hf", "dataset": {"path": "data.jsonl"},
            "training": {"epochs": 2, "micro_batch_size": 4, "max_seq_len": 2048}}
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return write_recipe(folder, yaml.safe_dump(data))


def plan_for(path: Path, **kwargs):
    recipe = load_recipe(path)
    return recipe, make_plan(recipe, inspect_dataset(recipe), offers=OFFERS, **kwargs)


def test_offers_that_do_not_fit_are_never_chosen(tmp_path):
    recipe, plan = plan_for(recipe_file(tmp_path, method="full", training={"optimizer": "adamw"}))
    fits = [e.fits for e in plan.estimates]
    assert fits == sorted(fits, reverse=True)  # every fitting offer before every other
    assert {e.offer.gpu for e in plan.estimates if not e.fits} == {"T4", "A10", "A10G"}
    chosen = plan.chosen
    assert chosen.fits and chosen.offer.gpu == "A100-80GB"  # the T4 is cheapest per hour, and useless
    assert all(e.fits for e in plan.candidates())
    shape, setup = resolve_model(recipe).shape, TrainSetup.from_recipe(recipe)
    for e in plan.estimates:
        rows = e.micro_batch_size * 2048
        needed = required_bytes(memory_peak(shape, setup, rows, e.checkpointed_layers))
        assert (needed <= usable_gib(e.offer) * GIB) == e.fits
        assert e.gradient_checkpointing or e.fits  # a misfit was tried with checkpointing too
    costs = [e.cost_high for e in plan.estimates if e.fits]
    assert costs == sorted(costs)


def test_checkpointing_and_micro_batch_are_chosen_to_fit(tmp_path):
    recipe, plan = plan_for(recipe_file(tmp_path, method="qlora", training={"micro_batch_size": 2}))
    by_gpu = {e.offer.gpu: e for e in plan.estimates if e.offer.gpu_count == 1}
    assert not by_gpu["H100"].gradient_checkpointing  # 80 GB hold 2 × 2048 tokens' activations
    assert by_gpu["A10G"].gradient_checkpointing and by_gpu["A10G"].fits
    # only as many layers as the 24 GB need: fewer recomputed layers, faster than checkpointing all 32
    assert 0 < by_gpu["A10G"].checkpointed_layers < 32 and "checkpointing on for" in by_gpu["A10G"].why
    assert by_gpu["H100"].peak_gib > by_gpu["A10G"].peak_gib

    # 16 rows of 2048 tokens in bf16 LoRA do not fit 24 GB even with checkpointing: halve the rows
    path = recipe_file(tmp_path, method="lora", training={"micro_batch_size": 16, "gradient_accumulation": 2})
    recipe, plan = plan_for(path, gpu="A10G")
    chosen = plan.chosen
    assert chosen.fits and chosen.gradient_checkpointing and chosen.micro_batch_size < 16
    fitted, changes = fitted_recipe(recipe, chosen)
    assert changes and fitted.training.micro_batch_size * fitted.training.gradient_accumulation == 32
    assert fitted.training.micro_batch_size == chosen.micro_batch_size and fitted.source == recipe.source
    assert (recipe.training.micro_batch_size, recipe.training.gradient_accumulation) == (16, 2), "a new recipe"


def test_gpus_without_bf16_take_lora_in_fp16_and_refuse_full_or_a_bf16_demand(tmp_path, ct_home):
    small = {"model": "Qwen/Qwen2.5-0.5B"}
    _, lora = plan_for(recipe_file(tmp_path, **small), gpu="T4")
    assert lora.chosen is not None and lora.chosen.offer.gpu == "T4" and "in fp16 with loss scaling" in lora.chosen.why
    _, full = plan_for(recipe_file(tmp_path, method="full", training={"micro_batch_size": 1}, **small))
    t4, = [e for e in full.estimates if e.offer.gpu == "T4"]
    assert not t4.fits and t4.why == "full fine-tuning needs bf16, and T4 has only fp16"
    assert t4.peak_gib < 13, "memory alone would have fitted: the refusal is the precision's"
    assert full.chosen.offer.gpu == "A10"  # the cheapest GPU with bf16
    # in a process of its own: the plan reads the catalog through SkyPilot, which must not be imported here
    (tmp_path / "home").mkdir()
    refused = cli_process(sky_env(tmp_path / "home", ct_home), "run", "--backend", "skypilot", "--dry-run",
                          "--gpu", "T4", str(tmp_path / "recipe.yaml"))
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "full fine-tuning needs bf16, and T4 has only fp16" in message
    assert "try a GPU with bf16" in message and "Traceback" not in message
    _, bf16 = plan_for(recipe_file(tmp_path, training={"precision": "bf16"}, **small), gpu="T4")
    assert bf16.chosen is None and bf16.estimates[0].why == "training.precision bf16, and T4 has no bf16"


def test_a_memory_limit_plans_as_the_smaller_card_would(tmp_path):
    """memory_limit_gib rehearses a 24 GB card on an H100: the plan checkpoints as it would on the A10G."""
    for name in ("free", "capped", "tiny"):
        (tmp_path / name).mkdir()
    _, free = plan_for(recipe_file(tmp_path / "free", method="qlora", training={"micro_batch_size": 2}), gpu="H100")
    _, capped = plan_for(recipe_file(tmp_path / "capped", method="qlora",
                                     training={"micro_batch_size": 2, "memory_limit_gib": 22}), gpu="H100")
    assert not free.chosen.gradient_checkpointing
    assert capped.chosen.gradient_checkpointing and capped.chosen.fits and capped.chosen.peak_gib < 22
    _, tiny = plan_for(recipe_file(tmp_path / "tiny", method="qlora", training={"memory_limit_gib": 2}), gpu="H100")
    assert tiny.chosen is None and all(not e.fits and "needs" in e.why for e in tiny.estimates)


def test_the_estimate_adds_up(tmp_path):
    recipe, plan = plan_for(recipe_file(tmp_path, method="qlora"))
    report = inspect_dataset(recipe)
    for e in plan.estimates:
        assert e.tokens == plan.tokens == report.tokens * 2  # two epochs
        assert 0 < e.tokens_per_s_low < e.tokens_per_s_high
        assert 0 < e.hours_low < e.hours_high
        assert e.cost_low == pytest.approx(e.hours_low * e.price_per_hour, abs=0.01)
        assert e.cost_high == pytest.approx(e.hours_high * e.price_per_hour, abs=0.01)
        assert e.hours_high > plan.tokens / e.tokens_per_s_low / 3600  # overheads come on top
    h100 = next(e for e in plan.estimates if e.offer.gpu == "H100" and e.offer.gpu_count == 1)
    a10 = next(e for e in plan.estimates if e.offer.gpu == "A10")
    assert h100.tokens_per_s_low > 3 * a10.tokens_per_s_high  # 989 vs 125 TFLOP/s, and no recomputation

    _, longer = plan_for(recipe_file(tmp_path, method="qlora", training={"epochs": 6}))
    assert longer.chosen.hours_high > plan.chosen.hours_high and longer.tokens == 3 * plan.tokens

    _, spot = plan_for(recipe_file(tmp_path, method="qlora"), spot=True)
    assert [e.offer.instance_type for e in spot.estimates] == ["g5.xlarge"]  # the only offer with a spot price
    assert spot.chosen.spot and spot.chosen.price_per_hour == 0.45


def test_gpu_and_count_narrow_the_offers(tmp_path):
    path = recipe_file(tmp_path, method="qlora")
    _, a10 = plan_for(path, gpu="A10")
    assert {e.offer.gpu for e in a10.estimates} == {"A10", "A10G"} and any("A10G" in n for n in a10.notes)
    recipe = load_recipe(path)
    recipe.compute.gpu_count = 2
    plan = make_plan(recipe, inspect_dataset(recipe), offers=OFFERS)
    assert [e.offer.instance_type for e in plan.estimates] == ["gpu_2x_h100_sxm5"]
    assert not any("one GPU per machine" in note for note in plan.notes)
    single = next(e for e in plan_for(path, gpu="H100")[1].estimates if e.offer.gpu_count == 1)
    two = plan.estimates[0]
    assert two.world_size == 2 and two.parallelism == "ddp"  # QLoRA of 7B fits one H100: replicas
    # the second GPU trains too, at the assumed DDP scaling
    assert two.tokens_per_s_high == pytest.approx(2 * two.scaling_high * single.tokens_per_s_high, rel=0.01)
    assert not two.scaling_measured and any("scaling assumed, not measured" in note for note in plan.notes)
    with pytest.raises(CloudtuneError, match="no offer"):
        plan_for(path, gpu="V100")


def test_a_plan_over_budget_is_refused(tmp_path):
    _, plan = plan_for(recipe_file(tmp_path, method="qlora"))
    check_budget(plan, plan.chosen.cost_high + 0.01)
    with pytest.raises(CloudtuneError) as refused:
        check_budget(plan, plan.chosen.cost_high / 2)
    assert "max_cost" in refused.value.message and f"${plan.chosen.cost_high:.2f}" in refused.value.message


def test_unknown_model_offline_is_one_clear_error(tmp_path):
    path = recipe_file(tmp_path, model="acme/secret-model")
    result = CliRunner().invoke(cli, ["cost", str(path)])
    assert result.exit_code == 2
    assert "acme/secret-model" in result.output and "params: 8B" in result.output
    assert "Traceback" not in result.output


def test_hub_datasets_are_estimated_when_known_and_flagged_when_not(tmp_path):
    def plan_hub(hub: str):
        path = write_recipe(tmp_path, yaml.safe_dump({"model": "meta-llama/Llama-2-7b-hf", "method": "qlora",
                                                      "dataset": {"hub": hub, "format": "llama2-inst"}}))
        recipe = load_recipe(path)
        return make_plan(recipe, inspect_dataset(recipe), offers=OFFERS)

    known = plan_hub("mlabonne/guanaco-llama2-1k")  # what the shipped seed recipes train on
    assert 300_000 < known.tokens < 600_000 and not known.tokens_exact
    assert any("1,000 rows as published" in note for note in known.notes)
    unknown = plan_hub("acme/private-set")
    assert unknown.tokens == 0 and any("max_steps" in note for note in unknown.notes)
    with pytest.raises(CloudtuneError, match="cannot be checked"):
        check_budget(unknown, 100.0)


def test_cost_cli_json_schema_and_cache(tmp_path, ct_home):
    home = tmp_path / "home"
    home.mkdir()
    path = recipe_file(tmp_path, method="qlora")
    env = sky_env(home, ct_home)
    run = subprocess.run([sys.executable, "-m", "cloudtune.cli", "cost", str(path), "--json", "--top", "5"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert set(data) == {"recipe", "tokens", "tokens_exact", "training_priced", "snapshot_date", "model_source",
                         "notes", "catalog", "left_out", "chosen", "fastest", "estimates", "offers_total",
                         "enabled_clouds"}
    assert data["tokens"] > 0 and data["tokens_exact"] is False  # no Llama tokenizer offline: estimated
    # the offers bundled with the price snapshot: a fresh HOME prices without importing SkyPilot
    assert data["catalog"]["from_cache"] is True and "2026" in data["catalog"]["prices"]
    assert len(data["estimates"]) == 5 < data["offers_total"]
    # every figure's field names its unit
    estimate_keys = {"offer", "spot", "fits", "peak_gib", "needs_gib", "micro_batch_size", "gradient_checkpointing",
                     "tokens", "tokens_per_s_low", "tokens_per_s_high", "hours_low", "hours_high", "cost_usd_low",
                     "cost_usd_high", "why", "usd_per_hour", "checkpointed_layers", "nodes", "world_size",
                     "parallelism", "scaling_low", "scaling_high", "scaling_measured"}
    offer_keys = {"cloud", "region", "instance_type", "gpu", "gpu_count", "gpu_memory_gib", "usd_per_hour",
                  "spot_usd_per_hour", "accelerator"}
    for e in [data["chosen"], *data["estimates"]]:
        assert set(e) == estimate_keys and set(e["offer"]) == offer_keys
        assert e["cost_usd_low"] <= e["cost_usd_high"] and e["fits"] and e["needs_gib"] > e["peak_gib"]
    assert data["chosen"] == data["estimates"][0]
    assert data["fastest"]["fits"] and data["fastest"]["hours_high"] <= data["chosen"]["hours_high"]
    for e in data["estimates"]:
        assert e["world_size"] == e["offer"]["gpu_count"] * e["nodes"] and e["parallelism"] in ("ddp", "fsdp")
    assert [e["cost_usd_high"] for e in data["estimates"]] == sorted(e["cost_usd_high"] for e in data["estimates"])

    again = subprocess.run([sys.executable, "-m", "cloudtune.cli", "cost", str(path), "--gpu", "A10"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "cheapest that fits" in again.stdout and "A10G" in again.stdout and "snapshot" in again.stdout
    cached = json.loads(subprocess.run([sys.executable, "-m", "cloudtune.cli", "cost", str(path), "--json"],
                                       env=env, capture_output=True, text=True, timeout=300).stdout)
    assert cached["catalog"]["from_cache"] is True and cached["chosen"] == data["chosen"]

    over = subprocess.run([sys.executable, "-m", "cloudtune.cli", "run", str(path), "--backend", "skypilot",
                           "--max-cost", "0.01"], env=env, capture_output=True, text=True, timeout=300)
    assert over.returncode == 2 and "max_cost $0.01" in over.stderr and "Traceback" not in over.stderr


def test_local_run_is_this_machine_at_zero_dollars_in_plan_receipt_and_status(tmp_path):
    path = write_recipe(tmp_path, demo_recipe_text(max_steps=3))
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(path), "--backend", "local", "--max-cost", "0.01"])
    assert result.exit_code == 0, result.output
    assert "this machine" in result.output and "$0" in result.output
    assert "cost: estimate / actual" in result.output
    status = runner.invoke(cli, ["status", "--json"])
    run = json.loads(status.output)[0]
    assert run["status"] == "succeeded" and run["est_cost_usd_high"] == 0.0 and run["actual_cost_usd"] == 0.0
    receipt = json.loads((Path(run["output_dir"]) / "receipt.json").read_text())
    assert receipt["estimate"]["gpu"] == "local" and receipt["actual_cost_usd"] == 0.0


def test_plan_dataclasses_keep_their_contract():
    """The SkyPilot backend reads Offer/Estimate; cost only adds defaulted fields."""
    offer = replace(OFFERS[3], accelerator="A100-80GB-SXM")
    assert offer.sky_accelerator == "A100-80GB-SXM" and OFFERS[0].sky_accelerator == "T4"


# ----------------------------------------------------------------------------------------------
# The throughput model against cloudtune's measured runs


def test_per_document_attention_spans_half_the_token_weighted_document():
    from cloudtune.datasets import DatasetReport
    from cloudtune.planning.work import document_attention_span

    same = DatasetReport("d", "completion", 100, 40_000, True, 0, 400, "t", length_percentiles=[400] * 101)
    assert document_attention_span(same, cap=4096) == pytest.approx(200)
    # long documents hold most tokens, so a token's document is longer than the mean document
    mixed = DatasetReport("d", "completion", 100, 40_000, True, 0, 1000,
                          "t", length_percentiles=[100] * 50 + [1000] * 51)
    assert 275 < document_attention_span(mixed, cap=4096) <= 500
    assert document_attention_span(mixed, cap=256) <= 128


def test_the_per_micro_batch_cost_is_recovered_from_rows_that_obey_it():
    from cloudtune.planning.calibration import calibrate, row_conditions
    from cloudtune.planning.flops import launch_weight

    base = dict(stack="cloudtune", gpu="H100", model="Llama-2-7B", method="lora", gradient_checkpointing=False,
                width=4096, attention_span=300)  # no lora_targets: no LoRA kernel time to take out first
    rows = [dict(base, micro_batch_tokens=tokens, tokens_per_s=20_000 * tokens / (tokens + 3000))
            for tokens in (1024, 4096, 16384)]
    calibrated, extra = calibrate(rows)
    assert extra * launch_weight(row_conditions(rows[0])) == pytest.approx(3000, abs=30)
    assert max(r["efficiency"] for r in calibrated) == pytest.approx(min(r["efficiency"] for r in calibrated),
                                                                     rel=0.01)


def test_each_measured_run_is_predicted_from_the_others():
    """Leave-one-out over cloudtune's own H100 rows: the time predicted from the other runs of the same
    method (middle of its range) is within 20 % of the measured one."""
    from cloudtune.planning.calibration import calibrate, load_calibration_rows, row_conditions
    from cloudtune.planning.throughput import gpu_tokens_per_second

    lines = load_calibration_rows()
    checked = 0
    for index, row in enumerate(lines):
        if row["stack"] != "cloudtune" or not row.get("micro_batch_tokens"):
            continue
        others = lines[:index] + lines[index + 1:]
        if sum(o["stack"] == "cloudtune" and o["method"] == row["method"] for o in others) < 2:
            continue  # too few others of its method to predict from
        low, high = gpu_tokens_per_second(row["gpu"], row_conditions(row), True, calibrated=calibrate(others))
        time_error = row["tokens_per_s"] / ((low + high) / 2) - 1  # predicted seconds / measured seconds - 1
        assert time_error == pytest.approx(0, abs=0.20), row["source"]
        checked += 1
    assert checked >= 6


def test_a_spot_estimate_includes_skypilots_jobs_controller_vm(tmp_path):
    """A spot run is a managed job, and its controller is a VM billed from the job's start until it
    stops itself 10 idle minutes after: the estimate adds it on top of the GPU's spot price."""
    from cloudtune.planning.overheads import CONTROLLER_EXTRA_MINUTES, CONTROLLER_PRICE_PER_HOUR

    _, plan = plan_for(recipe_file(tmp_path, method="qlora"), gpu="A10G", spot=True)
    spot = plan.chosen
    assert spot.spot and spot.offer.instance_type == "g5.xlarge"
    gpu_low, gpu_high = spot.hours_low * 0.45, spot.hours_high * 0.45
    controller_high = CONTROLLER_PRICE_PER_HOUR * (spot.hours_high + CONTROLLER_EXTRA_MINUTES[1] / 60)
    assert spot.cost_high == pytest.approx(gpu_high + controller_high, abs=0.01)
    assert spot.cost_low > gpu_low + CONTROLLER_PRICE_PER_HOUR * spot.hours_low
    assert "SkyPilot's jobs controller VM" in spot.why
    _, on_demand = plan_for(recipe_file(tmp_path, method="qlora"), gpu="A10G", spot=False)
    assert on_demand.chosen.cost_high == pytest.approx(on_demand.chosen.hours_high * 1.01, abs=0.01)
    assert "controller" not in on_demand.chosen.why


def test_cost_says_when_fp8_would_be_cheaper_on_an_offer_with_fp8(tmp_path):
    from dataclasses import replace

    from cloudtune.planning.planner import estimate_offer, fp8_note

    recipe, plan = plan_for(recipe_file(tmp_path, method="lora"))
    report, model = inspect_dataset(recipe), resolve_model(recipe)
    h100 = next(e for e in plan.estimates if e.fits and e.offer.gpu == "H100")
    as_fp8 = estimate_offer(recipe.model_copy(update={"method": "fp8"}), report, model, h100.offer, False)
    assert as_fp8.fits
    # the first fitting offer with FP8 is the H100 (the A100 and A10s have none); dearer than fp8 there: a note
    dear = [replace(e, cost_low=as_fp8.cost_low * 2, cost_high=as_fp8.cost_high * 2) if e is h100 else e
            for e in plan.estimates]
    note = fp8_note(recipe, report, model, dear, False)
    assert note and note.startswith("method fp8 would cost ") and "on H100×1 (lambda) instead of" in note
    assert note.endswith("for lora")
    # as cheap as fp8 or cheaper: no note; no GPU with FP8 among the fitting offers: no note
    cheap = [replace(e, cost_low=as_fp8.cost_low / 2, cost_high=as_fp8.cost_high / 2) if e is h100 else e
             for e in plan.estimates]
    assert fp8_note(recipe, report, model, cheap, False) is None
    assert fp8_note(recipe, report, model, [e for e in dear if not SPECS[e.offer.gpu].fp8], False) is None
    fp8_recipe = recipe.model_copy(update={"method": "fp8"})
    assert fp8_note(fp8_recipe, report, model, dear, False) is None  # nothing to switch to
