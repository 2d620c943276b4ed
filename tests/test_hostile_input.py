"""Hostile and unlucky input: every bad recipe or dataset is one clear message and exit 2, never a
traceback, a hang or unbounded memory (issue 15, "Bad input"). One test per class of input; the
property test in test_hostile_fuzz.py generates many more of each."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cloudtune.cli import cli

from .conftest import DEMO_RECIPE, write_recipe

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
    "raw NUL byte": ("x: a\x00b\n", ["recipe.yaml:1:", "U+0000"]),
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


def test_a_lone_surrogate_in_the_data_is_a_row_error(tmp_path):
    data = ROWS + '{"text": "### Alice: \\ud800\\n### Bob: b"}\n'
    refused(invoke("validate", str(write(tmp_path, demo(tmp_path, data)))), "data.jsonl:6", "surrogate U+D800")


def test_a_conversation_too_long_to_split_in_seconds_is_refused(tmp_path):
    import json

    messages = [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(20_000)]
    path = write(tmp_path, demo(tmp_path, json.dumps({"messages": messages}) + "\n", dataset__format="auto"))
    result = invoke("validate", str(path), seconds=20)
    refused(result, "data.jsonl:1", "20,000 messages")
    assert result.elapsed < 5


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


# ----------------------------------------------------------------------------------------------
# The property: whatever the recipe and dataset, exit 0 or 2, no traceback, done in seconds

@pytest.mark.parametrize("name, problem", [
    ("someone/model", "not in this machine's Hugging Face cache, and the hub cannot be reached from here"),
    ("/nonexistent/model", "neither a folder on this machine nor a hub id"),
    ("{empty}", "it holds no tokenizer files")])
def test_a_model_that_cannot_be_loaded_is_named_with_why_not_a_traceback(tmp_path, monkeypatch, capsys, name,
                                                                          problem):
    from cloudtune.train.__main__ import main as train_main

    from .conftest import demo_recipe_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as here anyway: the hub is unreachable
    (tmp_path / "empty").mkdir()
    name = name.format(empty=tmp_path / "empty")
    text = demo_recipe_text(max_steps=2).replace("init: tiny-llama", f"name: {name}")
    assert train_main([str(write_recipe(tmp_path, text)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"model.name '{name}' cannot be loaded: {problem}" in err and "hf download" in err, err
    assert "Traceback" not in err


from hypothesis import HealthCheck, Phase, event, given, settings  # noqa: E402 - the fuzz section's own imports
from hypothesis import strategies as st  # noqa: E402

ANY_CHAR = st.characters(exclude_categories=())  # surrogates, controls and escapes included
HOSTILE_STRINGS = ["", " ", "../../escape", "/etc/passwd", "/dev/zero", "~nosuchuser/x", "x" * 300, "a\x00b",
                   "\ud800", "\x1b[31mred", "data", "fifo.jsonl", "loop.jsonl", "8B", "1e300", "nan", "on"]
SCALARS = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 0, -1, 1e300, 2**32, 2**64, True, None]),
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.sampled_from(HOSTILE_STRINGS),
    st.text(ANY_CHAR, max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(ANY_CHAR, max_size=6), SCALARS,
                                                                            max_size=2))
FIELDS = [("name",), ("model",), ("model", "name"), ("model", "params"), ("model", "init"), ("method",),
          ("lora", "r"), ("lora", "alpha"), ("lora", "dropout"), ("lora", "target_modules"), ("dataset",),
          ("dataset", "path"), ("dataset", "format"), ("dataset", "max_rows"), ("dataset", "columns"),
          ("dataset", "columns", "text"), ("training", "epochs"), ("training", "max_steps"), ("training", "seed"),
          ("training", "max_seq_len"), ("training", "micro_batch_size"), ("training", "gradient_accumulation"),
          ("training", "memory_limit_gib"), ("training", "learning_rate"), ("outputs", "dir"),
          ("outputs", "samples"), ("compute", "gpu"), ("compute", "gpu_count"), ("compute", "max_cost"),
          ("secrets",), ("tracking",), ("unknown",), ("training", "unknown")]
# Valid but extreme: these reach the planner, which must still answer in seconds.
EDGES = [(("model",), {"name": "someone/model", "params": "1M"}), (("model",), {"name": "x/y", "params": "70B"}),
         (("model",), "meta-llama/Llama-2-70b-hf"), (("method",), "full"), (("method",), "qlora"),
         (("training", "memory_limit_gib"), 0.001), (("training", "gradient_accumulation"), 65536),
         (("training", "max_steps"), 10**9), (("training", "max_seq_len"), 131072), (("compute", "gpu_count"), 16),
         (("training", "micro_batch_size"), 1024), (("compute", "max_cost"), 0.0001), (("dataset", "max_rows"), 1)]
YAML_SNIPPETS = [ALIAS_BOMB, "r: &r [*r]\n", "d: " + "[" * 200 + "]" * 200 + "\n", "t: !!int abc\n",
                 "t: !!float x\n", "t: !!binary '%%'\n", "t: !!timestamp 2020-99-99\n", "name: a\nname: b\n",
                 "n: " + "7" * 4400 + "\n", "? [a]\n: b\n", "t: !!python/name:os.system\n", "\t- x\n", "x: *nope\n",
                 "--- \n--- \n", "x: 'unclosed\n", "\x00\n", "x: \"\\ud800\"\n"]
GOOD_LINE = '{"text": "### Alice: hi\\n### Bob: hello"}\n'
DATA_LINES = st.sampled_from([GOOD_LINE, "\n", "{bad\n", "[1, 2]\n", '{"text": 5}\n', '{"text": ""}\n', "null\n",
                              "[" * 5000 + "\n", '{"text": "\\ud800"}\n', '{"messages": [{"role": "user"}]}\n',
                              "\ufeff" + GOOD_LINE,
                              '"### Alice: x\n', "text\n", '{"\\u001b[2Jtext": "x"}\n', "\xff\xfe\n"])
DATASETS = st.one_of(
    st.lists(DATA_LINES, max_size=6).map(lambda lines: GOOD_LINE + "".join(lines)),
    st.binary(max_size=200), st.text(ANY_CHAR, max_size=200))


GOOD_DATA = {"data.jsonl": GOOD_LINE * 3, "data.json": "[" + ", ".join([GOOD_LINE.strip()] * 3) + "]",
             "data.csv": 'text\n"### Alice: hi\n### Bob: hello"\n'}


def _put(recipe: dict, dotted: tuple, value) -> None:
    *parents, last = dotted
    section = recipe
    for part in parents:
        section = section.setdefault(part, {}) if isinstance(section.get(part, {}), dict) else {}
    section[last] = value


@st.composite
def hostile_case(draw):
    """(recipe bytes, dataset file name, dataset bytes): the demo recipe, made extreme but valid (half the
    cases, so the planner is reached) or hostile (the other half: values, YAML, bytes and data)."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    hostile = draw(st.booleans())
    dataset = draw(st.sampled_from(["data.jsonl", "data.json", "data.csv", "data.parquet", "fifo.jsonl", "loop.jsonl",
                                    "folder.jsonl", "/dev/zero"] if hostile else list(GOOD_DATA)))
    recipe["dataset"]["path"] = dataset
    for dotted, value in draw(st.lists(st.sampled_from(EDGES), max_size=3)):
        _put(recipe, dotted, value)
    if not hostile:
        return yaml.safe_dump(recipe).encode(), dataset, GOOD_DATA[dataset].encode()
    for _ in range(draw(st.integers(1, 3))):
        _put(recipe, draw(st.sampled_from(FIELDS)), draw(VALUES))
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=draw(st.booleans()))
    if draw(st.booleans()):
        text += draw(st.sampled_from(YAML_SNIPPETS))
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:  # now and then a file cut short or with bytes spliced in
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=8))
    data = draw(DATASETS)
    return raw, dataset, data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data


@pytest.fixture
def fuzz_folder(tmp_path) -> Path:
    """Shared by every example of a test: the special files the generated paths point at."""
    folder = tmp_path / "fuzz"
    folder.mkdir()
    os.mkfifo(folder / "fifo.jsonl")
    (folder / "loop.jsonl").symlink_to(folder / "loop.jsonl")
    (folder / "folder.jsonl").mkdir()
    return folder


def _check_one(folder: Path, case, command: str, *flags: str) -> None:
    raw, dataset, data = case
    if "/" not in dataset and dataset.startswith("data"):
        (folder / dataset).write_bytes(data)
    (folder / "recipe.yaml").write_bytes(raw)
    result = invoke(command, *flags, str(folder / "recipe.yaml"), seconds=30)
    event(f"{command} exit {result.exit_code}")  # shown by --hypothesis-show-statistics
    nothing_fits = command == "cost" and result.exit_code == 1 and "no offer fits:" in result.output
    assert result.exit_code in (0, 2) or nothing_fits, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.elapsed < 10, f"{command} took {result.elapsed:.1f} s"
    if result.exit_code == 2:
        assert "error:" in result.output and "\x1b" not in result.output


# The suite runs a fixed sample in about half a minute; CLOUDTUNE_FUZZ_EXAMPLES=5000 runs that many
# fresh random cases per command instead (the "thousands").
DEEP = int(os.environ.get("CLOUDTUNE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(deadline=timedelta(seconds=10), database=None, derandomize=not DEEP,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FUZZ, max_examples=DEEP or 250)
@given(case=hostile_case())
def test_fuzz_validate_exits_0_or_2_quickly(fuzz_folder, case):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _check_one(fuzz_folder, case, "validate")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 512, f"validate grew the process by {grown_mib:.0f} MiB"


@settings(FUZZ, max_examples=DEEP or 25)
@given(case=hostile_case())
def fuzz_cost(folder: Path, case) -> None:
    _check_one(folder, case, "cost")


@settings(FUZZ, max_examples=DEEP or 25)
@given(case=hostile_case())
def fuzz_run_start(folder: Path, case) -> None:
    """`run` up to the moment it would rent: loading, counting, planning, the quote and the launch task."""
    _check_one(folder, case, "run", "--backend", "skypilot", "--dry-run")


def test_fuzz_cost_and_the_start_of_run_exit_0_or_2_quickly(fuzz_folder, tmp_path):
    """In a process of its own: planning imports SkyPilot, which tests/test_skypilot.py needs to import
    first, under its own HOME."""
    import subprocess
    import sys

    from .conftest import sky_env

    (tmp_path / "home").mkdir()
    code = ("import sys; from pathlib import Path; from tests import test_hostile_input as t\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(t.cli, ['cost', str(t.DEMO_RECIPE)]).exit_code == 0  # imports sky, untimed\n"
            "from cloudtune.wheel import build_wheel; build_wheel()  # the dry run's bundle carries it: built untimed\n"
            "t.fuzz_cost(folder=Path(sys.argv[1]))\n"
            "t.fuzz_run_start(folder=Path(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(fuzz_folder)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=sky_env(tmp_path / "home", tmp_path / "ct-home"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _short_and_local(raw: bytes) -> bytes | None:
    """A recipe that passed validate, cut to a couple of steps on the tiny model so a run takes seconds;
    None when the text cannot be read back as a mapping (then validate refused it anyway)."""
    try:
        recipe = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("training", {}), dict):
        return None
    training = recipe.setdefault("training", {})
    training.pop("epochs", None)
    training["max_steps"] = 2
    # A step of 65,536 micro-batches is a long training the plan prices honestly, not a hang: kept short.
    if isinstance(training.get("gradient_accumulation"), int) and training["gradient_accumulation"] > 4:
        training["gradient_accumulation"] = 4
    if isinstance(training.get("max_seq_len"), int) and training["max_seq_len"] > 256:
        training["max_seq_len"] = 256
    return yaml.safe_dump(recipe, allow_unicode=True).encode()


# Each case trains for real (~10 s): shrinking a failure would take many minutes, so it is reported as drawn.
@settings(FUZZ, max_examples=DEEP or 3, deadline=timedelta(seconds=240),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(case=hostile_case())
def fuzz_run_local(folder: Path, case) -> None:
    """Recipes that pass validate, trained for real on this machine: 0 with finite losses, or a message
    and 1/2, never a traceback, never a training left running."""
    raw, dataset, data = case
    if "/" not in dataset and dataset.startswith("data"):
        (folder / dataset).write_bytes(data)
    short = _short_and_local(raw)
    if short is None:
        return
    (folder / "recipe.yaml").write_bytes(short)
    if invoke("validate", str(folder / "recipe.yaml"), seconds=30).exit_code != 0:
        event("run: refused by validate")
        return
    result = invoke("run", "--backend", "local", str(folder / "recipe.yaml"), seconds=200)
    event(f"run exit {result.exit_code}")
    assert result.exit_code in (0, 1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    if result.exit_code:
        assert "error:" in result.output, result.output
    else:
        assert "loss nan" not in result.output.lower() and "loss inf" not in result.output.lower(), result.output
    leftover = subprocess.run(["pgrep", "-f", f"cloudtune.train .*{folder}"], capture_output=True, text=True).stdout
    assert not leftover, f"a training outlived its run: {leftover}"


def test_fuzz_local_runs_end_cleanly(fuzz_folder, tmp_path):
    fuzz_run_local(folder=fuzz_folder)
