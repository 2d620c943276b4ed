"""Every table at 80 and 120 columns: what a user copies (run ids, paths, commands, GPU names) is
printed whole, figures are written one way, and a narrow terminal gets fewer columns, not cut ones.

`cost` and `gpus` run the real CLI in a subprocess against the bundled price snapshot, with HOME a
fresh directory (SkyPilot's catalog folder lives there); the rest run through CliRunner.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from cloudtune import units
from cloudtune.cli import cli
from cloudtune.ledger import Ledger
from cloudtune.render import launch_order_table, receipt, runs_table

from .conftest import DEMO_RECIPE, demo_recipe_text, sky_env, write_recipe
from .fake_sky import a10_plan

WIDTHS = [80, 120]
REPO_TASKS = DEMO_RECIPE.parent
LONG_NAME = "a-recipe-with-a-rather-long-name-for-its-outputs"


def recorded(width: int) -> Console:
    return Console(width=width, file=io.StringIO(), record=True, color_system=None)


def table_lines(output: str, first_column: str) -> list[str]:
    """The rows of the table whose header line starts with the column `first_column`: the lines after
    its rule, up to a blank one or a line of text under the table."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(first_column)}\s{{2,}}\S", line))
    assert set(lines[start + 1].strip()) <= set("─-"), output
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or re.match(r"(cheapest|no offer|\*|\d+ more|note|  not planned)", line):
            break
        rows.append(line)
    return rows


@pytest.fixture
def sky_home(tmp_path, ct_home) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    return sky_env(home, ct_home)


def cloudtune(env: dict, width: int, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudtune.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**env, "COLUMNS": str(width), **extra_env})


@pytest.mark.parametrize("width", WIDTHS)
def test_cost_shows_one_line_per_offer_with_whole_names(tmp_path, sky_home, width):
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=300))
    shown = cloudtune(sky_home, width, "cost", str(recipe), "--top", "6")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(cloudtune(sky_home, width, "cost", str(recipe), "--top", "6", "--json").stdout)
    rows = table_lines(shown.stdout, "GPU")
    assert len(rows) == 6, shown.stdout  # one line per offer: no name broken over lines
    for row, estimate in zip(rows, data["estimates"], strict=True):
        offer = estimate["offer"]
        assert len(row) <= width
        assert row.startswith(units.gpus(offer["gpu"], offer["gpu_count"]) + " ") and offer["cloud"] in row
        assert units.money_range(estimate["cost_usd_low"], estimate["cost_usd_high"]) in row
        assert units.gib(estimate["needs_gib"]) in row
        if width >= 120:
            assert offer["instance_type"] in row  # the wide table also says where
    chosen = data["chosen"]["offer"]
    assert f"({chosen['region']}; {chosen['instance_type']})" in " ".join(shown.stdout.split())
    assert "tok/s" in shown.stdout and not re.search(r"(\S+) tok/s.*\1–\1", shown.stdout)
    assert not re.search(r"\$\d+\.\d\d–\d", shown.stdout), "a range writes $ on both ends"
    # the summary under the table keeps its indent when it wraps
    below = shown.stdout[shown.stdout.index("cheapest that fits"):shown.stdout.index("not shown")].splitlines()[1:-1]
    why = below[next(i for i, line in enumerate(below) if line.startswith("  ")):]
    assert why and all(line.startswith("  ") for line in why), shown.stdout
    assert len(why) >= 2 or width >= 120


@pytest.mark.parametrize("width", WIDTHS)
def test_cost_nothing_fits_is_exit_1_with_one_memory_figure(tmp_path, sky_home, width):
    recipe = REPO_TASKS / "llama2-7b-full.yaml"
    shown = cloudtune(sky_home, width, "cost", str(recipe), "--gpu", "A10:1")
    assert shown.returncode == 1, shown.stdout + shown.stderr
    needs = re.search(r"no offer fits: needs (\d+\.\d GiB)", shown.stdout).group(1)
    rows = table_lines(shown.stdout, "GPU")
    assert rows and all(needs in row and row.rstrip().endswith("no") for row in rows), shown.stdout
    assert json_exit(sky_home, recipe) == 1


def json_exit(env: dict, recipe: Path) -> int:
    # one GPU each: two A10s of a machine hold the full fine-tune, sharded
    return cloudtune(env, 80, "cost", str(recipe), "--gpu", "A10:1", "--json").returncode


@pytest.mark.parametrize("width", WIDTHS)
def test_gpus_lists_a_top_with_how_to_see_the_rest(sky_home, width):
    shown = cloudtune(sky_home, width, "gpus")
    assert shown.returncode == 0, shown.stderr
    rows = table_lines(shown.stdout, "GPU")
    assert len(rows) == 20 and all(len(row) <= width for row in rows), shown.stdout
    total = len(json.loads(cloudtune(sky_home, width, "gpus", "--json").stdout)["offers"])
    assert f"{total - 20} more offer(s) not shown; --top {total} shows all" in " ".join(shown.stdout.split())
    assert "not planned on:" in shown.stdout  # the whole catalog: the GPUs left out are worth a line

    h100 = cloudtune(sky_home, width, "gpus", "--gpu", "H100:8", "--spot", "--cloud", "aws,gcp")
    assert h100.returncode == 0, h100.stderr
    rows = table_lines(h100.stdout, "GPU")
    assert rows and all(row.startswith("H100×8 ") for row in rows), h100.stdout
    assert all(" aws " in row or " gcp " in row for row in rows)
    spot_prices = [float(row.split("$")[-1]) for row in rows]
    assert spot_prices == sorted(spot_prices)
    assert "not planned on" not in h100.stdout  # one GPU asked for: the others' reasons are noise


def test_a_terminal_without_unicode_gets_ascii(tmp_path, sky_home):
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=300))
    shown = cloudtune(sky_home, 80, "cost", str(recipe), "--top", "3", PYTHONIOENCODING="ascii")
    assert shown.returncode == 0, shown.stderr
    assert "x1 " in shown.stdout and "$0.0" in shown.stdout and "Traceback" not in shown.stderr
    shown.stdout.encode("ascii")


def add_run(run_id: str, name: str, output_dir: Path, **columns) -> None:
    ledger = Ledger()
    ledger.add_run(run_id, name=name, backend="local")
    ledger.update_run(run_id, status="succeeded", output_dir=str(output_dir), tokens=261_443, wall_seconds=244.0,
                      est_cost_low=0.0, est_cost_high=0.0, actual_cost=0.0, **columns)


@pytest.mark.parametrize("width", WIDTHS)
def test_status_shows_every_run_id_whole(tmp_path, width):
    ids = ["20261201-182042-43ea68", "20261201-190000-ffffff"]
    for run_id in ids:
        add_run(run_id, "llama2-7b-qlora-guanaco", tmp_path / "outputs" / run_id)
    shown = CliRunner().invoke(cli, ["status"], env={"COLUMNS": str(width)})
    assert shown.exit_code == 0, shown.output
    for run_id in ids:
        line = next(line for line in shown.output.splitlines() if line.startswith(run_id))
        assert line.startswith(run_id + " ") and len(line) <= width
    assert ("261,443" in shown.output) == (width >= 120)  # the wide table adds tokens, wall time, estimate
    data = json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)
    assert {"actual_cost_usd", "est_cost_usd_low", "wall_seconds", "created_at_unix"} <= set(data[0])


@pytest.mark.parametrize("width", WIDTHS)
def test_the_receipt_prints_its_paths_whole(tmp_path, width):
    out = tmp_path / "outputs" / LONG_NAME / "20261201-182042-43ea68"
    made = {"run_id": "20261201-182042-43ea68", "backend": "local", "machine": "ct-20261201-182042-43ea68",
            "device": "cpu", "wall_seconds": 244.0, "train_seconds": 220.0, "tokens": 261_443, "steps": 300,
            "tokens_per_s": 1189.0, "final_loss": 4.46, "weights_dir": "adapter", "weights_path": str(out / "adapter"),
            "output_dir": str(out), "estimate": {"gpu": "local", "price_per_hour": 0.0, "est_hours_low": 0.1,
                                                 "est_hours_high": 0.3, "est_cost_low": 0.0, "est_cost_high": 0.0},
            "actual_cost": 0.0}
    console = recorded(width)
    receipt(console, made)
    text = console.export_text()
    assert str(out / "adapter") in text and f"{out}\n" in text
    assert "4m" in text and "6m–18m / 4m" in text and "$0.00 / $0.00 (local at $0.00/h)" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_the_launch_order_keeps_gpu_names_whole(width):
    plan = a10_plan()
    fitting = [e.as_dict() for e in plan.estimates if e.fits]
    console = recorded(width)
    console.print(launch_order_table({"chosen": fitting[0], "fallbacks": fitting[1:]}, width))
    text = console.export_text()
    rows = table_lines(text, "try")
    assert [row.split()[1] for row in rows] == [units.gpus(e["offer"]["gpu"], 1) for e in fitting]
    assert all(len(row) <= width for row in rows)
    assert "g5.xlarge" in text or width < 120  # where the offer is, when there is room for it


@pytest.mark.parametrize("width", WIDTHS)
def test_init_prints_each_next_command_whole_on_its_own_line(tmp_path, monkeypatch, width):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "projects" / LONG_NAME / "recipe.yaml"
    shown = CliRunner().invoke(cli, ["init", str(target)], env={"COLUMNS": str(width)})
    assert shown.exit_code == 0, shown.output
    lines = [line.strip() for line in shown.output.splitlines()]
    for command in (f"cloudtune validate {target}", f"cloudtune cost {target}",
                    f"cloudtune run --backend local {target}"):
        assert command in lines
    listed = CliRunner().invoke(cli, ["init", "--list"], env={"COLUMNS": str(width)})
    assert all(len(line) <= width for line in listed.output.splitlines())
    assert re.search(r"^demo-tiny\s+Offline demo", listed.output, re.M)


def test_runs_table_picks_its_columns_by_what_fits():
    run = {"id": "20261201-182042-43ea68", "name": "llama2-7b-qlora-guanaco", "backend": "local", "status": "running",
           "launcher_alive": False, "created_at": 0.0, "wall_seconds": None, "tokens": None}
    narrow, wide = runs_table([run], 80), runs_table([run], 120)
    assert len(wide.columns) > len(narrow.columns)
    long = runs_table([{**run, "name": LONG_NAME}], 80)
    console = recorded(80)
    console.print(long)
    text = console.export_text()
    assert f"{run['id']} " in text and f"{LONG_NAME} " in text  # the name under the id, both whole
    assert all(word in text.split() for word in "running (its CLI is gone)".split())  # wrapped between words


def test_figures_are_written_one_way():
    assert units.money_range(0.04, 0.1) == "$0.04–$0.10"
    assert units.tokens_per_second(163_700, 163_740) == "163.7k tok/s"
    assert [units.duration(s) for s in (42, 244, 1020, 4800)] == ["42s", "4m", "17m", "1h20m"]
    assert units.hours_range(0.083, 0.28) == "5m–17m"
    assert units.gpus("A10G", 1) == "A10G×1" and units.gib(42.14) == "42.1 GiB"
    assert units.with_units({"offer": {"price_per_hour": 1.0}, "cost_low": 2}) == \
        {"offer": {"usd_per_hour": 1.0}, "cost_usd_low": 2}


def test_help_of_every_command_fits_80_columns():
    for command in ["--help"] + [f"{name} --help" for name in cli.commands]:
        shown = CliRunner().invoke(cli, command.split(), env={"COLUMNS": "80"})
        assert shown.exit_code == 0, shown.output
        assert all(len(line) <= 80 for line in shown.output.splitlines()), command

