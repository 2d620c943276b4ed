"""dataset.eval, early stopping and outputs.keep best, on the tiny model; and eval tokens in `validate` and `cost`.

The eval loss is checked against an independent computation: the saved adapter reloaded with peft,
each held-out document run on its own with plain cross-entropy over its answer tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cloudtune.datasets import held_out, inspect_dataset, split_eval
from cloudtune.errors import CloudtuneError
from cloudtune.planning.work import PACKING_FILL, plan_work
from cloudtune.recipe import load_recipe
from cloudtune.train.data import IGNORE, encode, load_rows
from cloudtune.train.model import load_tokenizer, tiny_llama_dir

from .test_cost import plan_for, recipe_file
from .test_train import ALPACA, make_recipe, metrics, run


def fast_recipe(folder: Path, **sections) -> Path:
    """Few steps and a small held-out set: this machine's CPU is shared."""
    training = {"max_steps": 12, "eval_steps": 3, **sections.pop("training", {})}
    dataset = {"completions_only": True, "eval": 6, **sections.pop("dataset", {})}
    return make_recipe(folder, ALPACA, training=training, dataset=dataset, **sections)


def reloaded_eval_loss(out: Path, recipe_path: Path) -> float:
    """The held-out rows' mean answer-token loss under the saved adapter, one document at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(recipe_path)
    _, held = split_eval(recipe, load_rows(recipe))
    examples = encode(recipe, load_tokenizer(recipe), held, fmt="alpaca", part="eval").examples
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir()), str(out / "adapter"))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
    return total / count


# ----------------------------------------------------------------------------------------------
# the split


def test_the_split_is_seeded_disjoint_and_the_same_in_validate_and_the_trainer(tmp_path):
    recipe = load_recipe(make_recipe(tmp_path, ALPACA, dataset={"eval": 0.25}))
    rows = load_rows(recipe)
    train_rows, eval_rows = split_eval(recipe, rows)
    assert len(eval_rows) == 16 and len(train_rows) == 48
    assert {where for where, _ in train_rows}.isdisjoint(where for where, _ in eval_rows)
    assert sorted(train_rows + eval_rows) == sorted(rows)
    assert held_out(recipe, 64) == held_out(recipe, 64), "seeded: the same rows every time"
    other = load_recipe(make_recipe(tmp_path / "other", ALPACA, dataset={"eval": 0.25}, training={"seed": 8}))
    assert held_out(other, 64) != held_out(recipe, 64), "another training.seed holds out other rows"
    assert sorted(held_out(recipe, 64)) != list(range(16)), "not simply the first rows"

    report = inspect_dataset(recipe)
    assert (report.rows, report.eval_rows) == (48, 16)
    everything = inspect_dataset(load_recipe(make_recipe(tmp_path / "all", ALPACA)))
    assert report.tokens + report.eval_tokens == everything.tokens and report.eval_tokens > 0


def test_an_eval_file_is_read_in_the_training_format_and_bad_rows_name_it(tmp_path):
    recipe_path = make_recipe(tmp_path, ALPACA, dataset={"eval": "held.jsonl"})
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ALPACA[:5]))
    report = inspect_dataset(load_recipe(recipe_path))
    assert (report.rows, report.eval_rows) == (64, 5) and report.eval_source.endswith("held.jsonl")
    (tmp_path / "held.jsonl").write_text(json.dumps({"instruction": "x", "input": ""}) + "\n")
    with pytest.raises(CloudtuneError, match=r"held.jsonl:1: .*output"):
        inspect_dataset(load_recipe(recipe_path))


@pytest.mark.parametrize(("sections", "message"), [
    ({"training": {"early_stopping": {"patience": 2}}}, r"training\.early_stopping: needs an eval loss"),
    ({"outputs": {"keep": "best"}}, r"outputs\.keep: needs an eval loss: add dataset\.eval"),
    ({"training": {"eval_steps": 5}}, r"training\.eval_steps: needs an eval loss"),
    ({"dataset": {"eval": 2.5}}, r"dataset\.eval\.split: is a share below 1 \(0\.1\) or a whole number of rows"),
    ({"dataset": {"eval": {"split": 0.1, "path": "x.jsonl"}}}, r"dataset\.eval: give exactly one of `split`"),
    ({"dataset": {"eval": "missing.jsonl"}}, r"dataset\.eval\.path: file not found"),
])
def test_eval_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, sections, message):
    with pytest.raises(CloudtuneError, match=message):
        load_recipe(make_recipe(tmp_path, ALPACA, **sections))


def test_holding_out_every_row_is_refused(tmp_path):
    recipe = load_recipe(make_recipe(tmp_path, ALPACA, dataset={"eval": 64}))
    with pytest.raises(CloudtuneError, match="holds out 64 of the 64 rows, leaving none to train on"):
        inspect_dataset(recipe)


# ----------------------------------------------------------------------------------------------
# training with an eval loss


def test_eval_loss_is_logged_masked_like_training_and_matches_the_saved_adapter(tmp_path, capsys):
    recipe_path = fast_recipe(tmp_path, tracking="tensorboard", training={"eval_steps": 5})
    out = tmp_path / "out"
    summary = run(recipe_path, out)
    log = capsys.readouterr().out
    rows = metrics(out)
    evaluated = [row["step"] for row in rows if "eval_loss" in row]
    assert evaluated == [5, 10, 12], "every eval_steps and after the last step"
    assert "eval: 6 held-out rows" in log and "step 10/12 loss" in log and "eval_loss" in log
    assert "data: 58 rows" in log, "held-out rows are not trained on"
    evaluation = json.loads((out / "run.json").read_text())["eval"]
    assert evaluation == summary["eval"]
    assert evaluation["rows"] == 6 and evaluation["evaluations"] == 3 and evaluation["kept"] == "last"
    assert evaluation["loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)
    assert not evaluation["stopped_early"] and summary["steps"] == 12
    # the last evaluation saw the weights that were saved: recomputed independently, per document
    assert reloaded_eval_loss(out, recipe_path) == pytest.approx(evaluation["loss"], abs=1e-4)
    assert 0 < evaluation["trained_tokens"] < evaluation["tokens"] / 5, "completions only: prompts carry no loss"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("eval/loss")] == [5, 10, 12]


def test_early_stopping_stops_and_keep_best_saves_the_best_step(tmp_path, capsys):
    # min_delta so large that no evaluation after the first counts as better: the first stays the best
    recipe_path = fast_recipe(tmp_path, training={"max_steps": 30, "eval_steps": 3,
                                                  "early_stopping": {"patience": 2, "min_delta": 100}},
                              outputs={"keep": "best"})
    out = tmp_path / "out"
    summary = run(recipe_path, out)
    log = capsys.readouterr().out
    assert summary["steps"] == 9, "best at step 3, then two evaluations without improvement"
    evaluation = summary["eval"]
    assert evaluation["stopped_early"] and evaluation["best_step"] == 3 and evaluation["kept_step"] == 3
    assert "early stopping: the eval loss has not improved by more than 100 for 2 evaluations" in log
    assert "keep best: the weights saved are those of step 3" in log
    losses = {row["step"]: row["eval_loss"] for row in metrics(out) if "eval_loss" in row}
    assert list(losses) == [3, 6, 9] and losses[3] != losses[9]
    assert reloaded_eval_loss(out, recipe_path) == pytest.approx(losses[3], abs=1e-4)
    assert not (out / "checkpoints").exists(), "the best weights' scratch file is gone"


def test_keep_best_picks_the_lowest_eval_loss(tmp_path):
    recipe_path = fast_recipe(tmp_path, training={"max_steps": 12, "eval_steps": 2, "learning_rate": 0.05},
                              outputs={"keep": "best"})
    out = tmp_path / "out"
    evaluation = run(recipe_path, out)["eval"]
    losses = {row["step"]: row["eval_loss"] for row in metrics(out) if "eval_loss" in row}
    best = min(losses, key=losses.get)
    assert evaluation["best_step"] == best == evaluation["kept_step"]
    assert reloaded_eval_loss(out, recipe_path) == pytest.approx(losses[best], abs=1e-4)


def test_a_resumed_run_keeps_the_best_weights_of_the_steps_before_it(tmp_path):
    import shutil

    recipe_path = fast_recipe(tmp_path, training={"max_steps": 12, "eval_steps": 3, "checkpoint_steps": 6,
                                                  "early_stopping": {"patience": 5, "min_delta": 100}},
                              outputs={"keep": "best"})
    out = tmp_path / "out"
    whole = run(recipe_path, out)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000006", resumed / "checkpoints" / "step-00000006")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    again = run(recipe_path, resumed, resume=True)
    assert again["eval"]["best_step"] == whole["eval"]["best_step"] == 3
    from safetensors.torch import load_file

    first = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    second = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------------------------
# validate and cost


def test_validate_counts_the_eval_rows(tmp_path):
    from click.testing import CliRunner

    from cloudtune.cli import cli

    recipe_path = make_recipe(tmp_path, ALPACA, dataset={"eval": 0.1})
    result = CliRunner().invoke(cli, ["validate", str(recipe_path), "--json"])
    assert result.exit_code == 0, result.output
    dataset = json.loads(result.output)["dataset"]
    assert (dataset["rows"], dataset["eval_rows"]) == (58, 6) and dataset["eval_tokens"] > 0
    table = CliRunner().invoke(cli, ["validate", str(recipe_path)], terminal_width=120)
    assert "6 rows" in table.output and "held out with seed 7" in table.output


def test_cost_prices_the_evaluations_as_forward_passes(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "eval").mkdir()
    _, plain = plan_for(recipe_file(tmp_path / "plain"))
    path = recipe_file(tmp_path / "eval", dataset={"eval": 0.2}, training={"eval_steps": 1})
    recipe, evaluated = plan_for(path)
    report = inspect_dataset(recipe)
    assert report.eval_rows == 80 and report.rows == 320
    work = plan_work(recipe, report)
    assert work.evaluations > 10 and work.eval_processed == pytest.approx(
        work.evaluations * report.eval_tokens / PACKING_FILL)
    note, = [n for n in evaluated.notes if n.startswith("dataset.eval")]
    assert f"{work.evaluations} evaluations of {report.eval_tokens:,} held-out tokens" in note
    with_eval = {e.offer.instance_type: e for e in evaluated.estimates}
    compared = 0
    # fewer rows to train on, but an evaluation of a fifth of the data after every step costs more
    for estimate in plain.estimates:
        other = with_eval[estimate.offer.instance_type]
        if estimate.fits and other.fits:
            assert other.hours_high > estimate.hours_high and other.tokens < estimate.tokens
            compared += 1
    assert compared >= 3


def test_a_local_run_ships_the_eval_file_and_its_receipt_shows_eval_loss_sample_and_report(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cloudtune.cli import cli

    monkeypatch.chdir(tmp_path)
    recipe_path = fast_recipe(tmp_path, dataset={"eval": "data/held.jsonl"}, training={"eval_steps": 6},
                              outputs={"samples": ["What is 3 plus 4?"], "sample_max_new_tokens": 4})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "held.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ALPACA[:4]))
    result = CliRunner().invoke(cli, ["run", "--backend", "local", str(recipe_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "eval: 4 held-out rows" in result.output, "the eval file travelled in the bundle"
    receipt = json.loads(next((tmp_path / "outputs").rglob("receipt.json")).read_text())
    evaluation = receipt["eval"]
    assert evaluation["rows"] == 4 and evaluation["evaluations"] == 2
    printed = " ".join(result.output.replace("│", " ").split())
    assert f"eval loss {evaluation['best_loss']:.4f} best at step {evaluation['best_step']}" in printed
    assert receipt["sample"]["prompt"] == "What is 3 plus 4?" and "before:" in printed and "after:" in printed
    assert Path(receipt["report"]).name == "report.html" and Path(receipt["report"]).is_file()
    assert "report" in printed and (Path(receipt["output_dir"]) / "report.png").is_file()
    status = CliRunner().invoke(cli, ["status", "--json"])
    assert json.loads(status.output)[0]["meta"]["eval_loss"] == evaluation["best_loss"]
