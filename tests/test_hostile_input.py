"""Hostile and unlucky input: every bad recipe or dataset is one clear message and exit 2, never a
traceback, a hang or unbounded memory (issue 15, "Bad input"). One test per class of input; the
property test in test_hostile_fuzz.py generates many more of each."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cloudtune.cli import cli

from .conftest import DEMO_RECIPE

ROWS = "".join(f'{{"text": "### Alice: what is {i} plus 1?\\n### Bob: {i + 1}"}}\n' for i in range(5))


def demo(tmp_path: Path, data: str | bytes = ROWS, file: str = "data.jsonl", **changes) -> dict:
    """The demo recipe as data, training on a small copy of its dataset in tmp_path."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    (tmp_path / file).write_bytes(data.encode() if isinstance(data, str) else data)
    recipe["dataset"]["path"] = file
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        section = recipe
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
    return recipe


def write(tmp_path: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def invoke(*args: str, seconds: float = 20):
    """Run the CLI in this process; a hang fails the test instead of stalling the suite."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=CliRunner().invoke(cli, list(args))), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"cloudtune {' '.join(args)} did not finish within {seconds} s"
    result = box["result"]
    result.elapsed = time.monotonic() - started
    return result


def refused(result, *fragments: str) -> str:
    """Exit 2 with a message (no traceback) that holds every fragment; returns the output."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "error:" in result.output
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} not in: {result.output}"
    return result.output


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/<name> is relative to where the CLI runs


# ----------------------------------------------------------------------------------------------
# YAML

NINE = ",".join(["*a"] * 9)
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))

YAML_CASES = {
    "500-deep nesting": ("x: " + "[" * 500 + "]" * 500 + "\n", ["recipe.yaml:1:", "nested more than 32 levels"]),
    "recursive alias": ("a: &a [*a]\n", ["recipe.yaml:1:", "recursive alias"]),
    "alias bomb": (ALIAS_BOMB, ["recipe.yaml:", "expands to more than"]),
    "bad int tag": ("x:\n  max_steps: !!int abc\n", ["recipe.yaml:2:", "!!int"]),
    "5,000-digit integer": ("x:\n  max_steps: " + "9" * 5000 + "\n", ["recipe.yaml:2:", "5,000 characters"]),
    "python tag": ("x: !!python/object:os.system ls\n", ["recipe.yaml:1:", "not valid YAML"]),
    "list as a key": ("? [a, b]\n: 1\n", ["recipe.yaml:1:", "plain name"]),
}


@pytest.mark.parametrize("name", YAML_CASES)
def test_hostile_yaml_is_refused_quickly_with_its_line(tmp_path, name):
    head, fragments = YAML_CASES[name]
    path = write(tmp_path, head + yaml.safe_dump(demo(tmp_path)))
    result = invoke("validate", str(path), seconds=10)
    refused(result, *fragments)
    assert result.elapsed < 5  # the alias bomb used to take 5-25 s and gigabytes


def test_duplicate_keys_name_both_lines(tmp_path):
    text = yaml.safe_dump(demo(tmp_path), sort_keys=False).replace("  seed: 42\n", "  seed: 42\n  seed: 7\n")
    lines = text.splitlines()
    first = lines.index("  seed: 42") + 1
    refused(invoke("validate", str(write(tmp_path, text))), "training.seed", f"lines {first} and {first + 1}")


@pytest.mark.parametrize("size", [300_000, 10 * 2**20])
def test_a_huge_value_is_never_echoed_whole(tmp_path, size):
    path = write(tmp_path, yaml.safe_dump(demo(tmp_path, name="HUGE")).replace("name: HUGE", "name: " + "x" * size))
    output = refused(invoke("validate", str(path)), str(path))
    assert len(output) < 2000


# ----------------------------------------------------------------------------------------------
# Paths


def test_dataset_paths_that_cannot_be_read_are_refused_before_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")  # reading it would block forever
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    cases = {
        "fifo.jsonl": "named pipe", "/dev/zero": "character device", "loop.jsonl": "cannot be followed",
        "folder.jsonl": "is a directory", "x" * 300 + ".jsonl": "255", "~nosuchuser/data.jsonl": "no user",
        "da\x00ta.jsonl": "NUL", "da\ud800ta.jsonl": "surrogate",
    }
    for dataset, message in cases.items():
        path = write(tmp_path, demo(tmp_path, dataset__path=dataset))
        for command in ("validate", "cost"):
            refused(invoke(command, str(path), seconds=10), "recipe.yaml:", "dataset.path", message)


def test_a_recipe_that_is_a_fifo_a_device_or_unprintable_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    refused(invoke("validate", str(tmp_path / "fifo.yaml"), seconds=10), "named pipe")
    refused(invoke("validate", "/dev/zero", seconds=10), "character device")
    odd = tmp_path / "r\udcff\x1b[2J.yaml"  # a name that is not UTF-8, with a terminal escape in it
    write(tmp_path, demo(tmp_path), odd.name)
    output = refused(invoke("validate", str(odd)), "the recipe's path contains")
    assert "\x1b" not in output


def test_csv_fields_over_the_default_limit_and_a_bom_are_accepted(tmp_path):
    long_row = "### Alice: " + "a" * 200_000 + "\n### Bob: b"
    data = "\ufefftext\n" + f'"{long_row}"\n' + '"### Alice: hi\n### Bob: hello"\n'
    path = write(tmp_path, demo(tmp_path, data, "data.csv"))
    result = invoke("validate", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert '"rows": 2' in result.output


def test_a_jsonl_with_a_bom_is_accepted(tmp_path):
    result = invoke("validate", str(write(tmp_path, demo(tmp_path, "\ufeff" + ROWS))), "--json")
    assert result.exit_code == 0 and '"rows": 5' in result.output, result.output


def test_an_unclosed_csv_quote_is_an_error_where_it_opens_not_dropped_rows(tmp_path):
    data = 'text\n"### Alice: a\n### Bob: b"\n"### Alice: c\n### Bob: d\nmore\nrows\n'
    refused(invoke("validate", str(write(tmp_path, demo(tmp_path, data, "data.csv")))),
            "data.csv:4:", "never closed")


@pytest.mark.parametrize("kind", ["fake", "truncated"])
def test_broken_parquet_is_a_clear_error(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["### Alice: hi\n### Bob: hello"] * 50}), tmp_path / "good.parquet")
    raw = (tmp_path / "good.parquet").read_bytes()
    data = b"text\nnot parquet at all\n" if kind == "fake" else raw[: len(raw) // 2]
    refused(invoke("validate", str(write(tmp_path, demo(tmp_path, data, "data.parquet")))),
            "data.parquet", "not a readable Parquet file")


def test_terminal_escapes_in_a_column_name_are_not_printed_raw(tmp_path):
    data = '{"\\u001b]0;owned\\u0007\\u001b[31mtext": "x"}\n'
    path = write(tmp_path, demo(tmp_path, data, dataset__format="auto"))
    output = refused(invoke("validate", str(path)), "data.jsonl:1", "\\u001b")
    assert "\x1b" not in output and "\x07" not in output


def test_a_bad_line_is_located_not_echoed(tmp_path):
    data = ROWS + '{"text": "hf_SECRETSECRETSECRET" "unterminated}\n'
    output = refused(invoke("validate", str(write(tmp_path, demo(tmp_path, data)))), "data.jsonl:6", "column")
    assert "SECRET" not in output


def test_max_rows_reads_the_same_rows_in_validate_and_the_trainer(tmp_path):
    from cloudtune.recipe import load_recipe
    from cloudtune.train.data import load_rows

    path = write(tmp_path, {**demo(tmp_path, ROWS + "{not json\n"), "dataset": {
        "path": "data.jsonl", "format": "completion", "max_rows": 5}})
    result = invoke("validate", str(path), "--json")
    assert result.exit_code == 0 and '"rows": 5' in result.output, result.output
    assert len(load_rows(load_recipe(path, here=False))) == 5  # the bad 6th line is read by neither
    path = write(tmp_path, {**demo(tmp_path, ROWS + "{not json\n"), "dataset": {
        "path": "data.jsonl", "format": "completion", "max_rows": 6}})
    refused(invoke("validate", str(path)), "data.jsonl:6")


# ----------------------------------------------------------------------------------------------
# Numbers

NUMBER_CASES = [
    ("training__epochs", float("inf"), "training.epochs"), ("lora__alpha", float("inf"), "lora.alpha"),
    ("training__seed", -1, "training.seed"), ("training__seed", 2**32, "training.seed"),
    ("training__max_steps", 10**30, "training.max_steps"),
]


@pytest.mark.parametrize("field,value,named", NUMBER_CASES, ids=[f"{c[0]}={c[1]}" for c in NUMBER_CASES])
def test_numbers_out_of_range_are_refused(tmp_path, field, value, named):
    recipe = demo(tmp_path, **{field: value})
    if field == "training__epochs":
        del recipe["training"]["max_steps"]
    refused(invoke("validate", str(write(tmp_path, recipe))), "recipe.yaml:", named)


@pytest.mark.parametrize("params", [0, -1, float("nan"), float("inf"), 1e300, "1" * 5000, "lots"])
def test_a_parameter_count_that_cannot_be_priced_is_refused(tmp_path, params):
    recipe = demo(tmp_path, model={"name": "someone/some-model", "params": params})
    for command in ("validate", "cost"):
        refused(invoke(command, str(write(tmp_path, recipe)), seconds=10), "recipe.yaml:", "model.params")


@pytest.mark.parametrize("config", ["[]", "{}", '{"hidden_size": 0}', "not json",
                                    '{"hidden_size": 64, "intermediate_size": -1, "num_hidden_layers": 2, '
                                    '"num_attention_heads": 4, "vocab_size": 100}'])
def test_a_local_model_config_without_usable_sizes_is_refused(tmp_path, config):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(config)
    recipe = demo(tmp_path, model={"name": "./model"})
    for command in ("validate", "cost"):
        refused(invoke(command, str(write(tmp_path, recipe))), "recipe.yaml:", "model.name", "config.json")


# ----------------------------------------------------------------------------------------------
# name and outputs.dir


@pytest.mark.parametrize("field,value,message", [
    ("name", "../../escape", "one file name"), ("name", "a/b", "one file name"),
    ("name", "nul\x00name", "NUL"), ("name", "sur\udc80rogate", "surrogate"),
    ("outputs__dir", "out\x00dir", "NUL"), ("outputs__dir", "\ud800", "surrogate"),
    ("outputs__dir", "/etc/passwd", "is a file"), ("outputs__dir", "/etc/passwd/sub", "not a directory"),
])
def test_names_and_output_dirs_that_cannot_be_written_are_refused(tmp_path, field, value, message):
    path = write(tmp_path, demo(tmp_path, **{field: value}))
    for command in ("validate", "cost"):
        refused(invoke(command, str(path)), "recipe.yaml:", field.replace("__", "."), message)


def test_a_read_only_outputs_dir_is_refused_before_the_run(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses new entries even to root
        target = "/sys/cloudtune-outputs"
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        target = str(tmp_path / "locked" / "outputs")
    path = write(tmp_path, demo(tmp_path, outputs__dir=target))
    refused(invoke("run", "--backend", "local", str(path)), "outputs.dir", "cannot be written")
    assert not (tmp_path / "ct-home" / "runs").exists() or not any((tmp_path / "ct-home" / "runs").iterdir())


def test_run_refuses_bad_input_before_starting_anything(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")
    for recipe in (demo(tmp_path, name="../../escape"), demo(tmp_path, dataset__path="fifo.jsonl"),
                   demo(tmp_path, ROWS + "{broken\n")):
        refused(invoke("run", "--backend", "local", str(write(tmp_path, recipe)), seconds=20))
        assert not (tmp_path / "outputs").exists()
    assert not (tmp_path.parent / "escape").exists()
