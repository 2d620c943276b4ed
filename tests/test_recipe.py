"""Bad recipes: each gives exit 2, no traceback, and a message naming the file, line and field."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.errors import CloudtuneError
from cloudtune.recipe import load_recipe

from .conftest import DEMO_RECIPE, write_recipe

GOOD_HEAD = """\
model: meta-llama/Llama-2-7b-hf
dataset:
  path: data.jsonl
"""

# (name, recipe text, what the message must contain)
BAD_RECIPES = [
    ("unknown top-level key", GOOD_HEAD + "trainig:\n  epochs: 1\n", ["trainig", "Did you mean 'training'", ":4"]),
    ("unknown nested key", GOOD_HEAD + "training:\n  learnin_rate: 0.1\n",
     ["training.learnin_rate", "Did you mean 'learning_rate'", ":5"]),
    ("wrong type", GOOD_HEAD + "training:\n  epochs: many\n", ["training.epochs", "valid number", ":5"]),
    ("negative lr", GOOD_HEAD + "training:\n  learning_rate: -0.001\n", ["training.learning_rate", "greater than 0"]),
    ("unknown method", GOOD_HEAD + "method: qlora+full\n",
     ["method", "'lora', 'qlora', '8bit', 'fp8' or 'full'", ":4"]),
    ("fp16 full fine-tuning", GOOD_HEAD + "method: full\ntraining:\n  precision: fp16\n",
     ["training.precision", "fp32", ":6"]),
    ("lora settings with full", GOOD_HEAD + "method: full\nlora:\n  r: 8\n", ["lora", "method 'full'", ":5"]),
    ("missing dataset", "model: meta-llama/Llama-2-7b-hf\n", ["dataset", "required"]),
    ("dataset file not found", "model: x/y\ndataset:\n  path: nowhere.jsonl\n", ["dataset.path", "not found", ":3"]),
    ("path and hub", "model: x/y\ndataset:\n  path: data.jsonl\n  hub: tatsu-lab/alpaca\n",
     ["dataset", "exactly one of"]),
    ("bad format", GOOD_HEAD + "  format: sharegpt\n", ["dataset.format", "'completion'"]),
    ("bad gradient checkpointing", GOOD_HEAD + "training:\n  gradient_checkpointing: sometimes\n",
     ["training.gradient_checkpointing", "'auto', 'on' or 'off'"]),
    ("epochs and max_steps", GOOD_HEAD + "training:\n  epochs: 1\n  max_steps: 10\n",
     ["training.max_steps", "not both"]),
    ("push without token", GOOD_HEAD + "outputs:\n  push_to_hub: me/adapter\n", ["outputs.push_to_hub", "HF_TOKEN"]),
    ("bad secret name", GOOD_HEAD + "secrets: [HF-TOKEN]\n", ["secrets.0", "not an environment variable"]),
    ("lora rank zero", GOOD_HEAD + "lora:\n  r: 0\n", ["lora.r", "greater than 0"]),
    ("unsupported data file", "model: x/y\ndataset:\n  path: data.txt\n", ["dataset.path", "unsupported file type"]),
    ("not a mapping", "- model\n- dataset\n", ["a recipe is a YAML mapping"]),
    ("yaml syntax", "model: x\ndataset: [unclosed\n", ["not valid YAML"]),
    ("model without name or init", "model: {revision: main}\ndataset:\n  path: data.jsonl\n", ["model", "init"]),
]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "data.txt").write_text("hello\n")
    return tmp_path


@pytest.mark.parametrize("name,text,expected", BAD_RECIPES, ids=[case[0] for case in BAD_RECIPES])
def test_bad_recipe_exits_2_naming_the_field(folder, name, text, expected):
    path = write_recipe(folder, text)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(path) in result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in: {result.output}"


def test_unreadable_and_non_utf8_recipes(tmp_path):
    raw = tmp_path / "latin1.yaml"
    raw.write_bytes(b"model: x/y\nname: caf\xe9\n")
    result = CliRunner().invoke(cli, ["validate", str(raw)])
    assert result.exit_code == 2 and "latin1.yaml:2" in result.output and "UTF-8" in result.output
    missing = CliRunner().invoke(cli, ["validate", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == 2 and "no such recipe file" in missing.output
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    result = CliRunner().invoke(cli, ["validate", str(folder)])
    assert result.exit_code == 2 and "is a directory" in result.output


@pytest.mark.parametrize("rows,expected", [
    ("", ["has no rows"]),
    ('{"text": "ok"}\n{"text": \n', ["data.jsonl:2", "not valid JSON"]),
    ('{"text": "ok"}\n{"body": "no text column"}\n', ["data.jsonl:2", "'text' is missing"]),
    ('{"text": "ok"}\n{"text": 5}\n', ["data.jsonl:2", "should be text"]),
    ('{"text": "ok"}\n{"text": "   "}\n', ["data.jsonl:2", "empty"]),
])
def test_bad_dataset_rows_named(tmp_path, rows, expected):
    (tmp_path / "data.jsonl").write_text(rows)
    path = write_recipe(tmp_path, GOOD_HEAD + "  format: completion\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output


def test_non_utf8_dataset(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    path = write_recipe(tmp_path, GOOD_HEAD)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "data.jsonl:2" in result.output and "UTF-8" in result.output


def test_yaml_on_off_means_gradient_checkpointing(folder):
    path = write_recipe(folder, GOOD_HEAD + "training:\n  gradient_checkpointing: on\n")
    assert load_recipe(path).training.gradient_checkpointing == "on"


def test_dataset_path_is_relative_to_the_recipe(folder, monkeypatch, tmp_path_factory):
    path = write_recipe(folder, GOOD_HEAD)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_recipe(path).dataset_file() == (folder / "data.jsonl").resolve()


def test_validate_counts_rows_and_tokens_of_the_demo():
    result = CliRunner().invoke(cli, ["validate", "--json", str(DEMO_RECIPE)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["dataset"]
    rows = [line for line in (DEMO_RECIPE.parent / "data" / "demo-chat.jsonl").read_text().splitlines() if line]
    assert report["rows"] == len(rows)
    # the tiny tokenizer is byte-level: tokens are the text's UTF-8 bytes plus BOS and EOS
    expected = sum(len(json.loads(r)["text"].encode()) + 2 for r in rows)
    assert report["tokens"] == expected and report["tokens_exact"]


def test_error_type_carries_a_hint(folder):
    with pytest.raises(CloudtuneError) as caught:
        load_recipe(write_recipe(folder, GOOD_HEAD + "trainig: {}\n"))
    assert caught.value.hint


@pytest.mark.parametrize("template", sorted(p.stem for p in DEMO_RECIPE.parent.glob("*.yaml")))
def test_every_shipped_recipe_validates(template):
    load_recipe(DEMO_RECIPE.parent / f"{template}.yaml")


def test_readme_recipe_reference_is_current():
    from cloudtune.reference import BEGIN, END, reference

    readme = (DEMO_RECIPE.parents[1] / "README.md").read_text()
    current = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)].strip()
    assert current == reference(), "README's recipe reference is stale: regenerate with python -m cloudtune.reference"
