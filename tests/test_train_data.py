"""Dataset formats, completions-only masks, truncation and bad data, on the trainer and the CLI side.

No training here: rows are rendered, checked and tokenized with the tiny byte-level tokenizer
(one token per UTF-8 byte, `<s>`/`</s>` as single special tokens), so every expected mask is exact.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.datasets import inspect_dataset
from cloudtune.errors import CloudtuneError
from cloudtune.formats import ALPACA_HEADER
from cloudtune.packing import pack
from cloudtune.recipe import load_recipe
from cloudtune.train.__main__ import main as train_main
from cloudtune.train.data import IGNORE, Batcher, encode, load_rows

from .conftest import module_home, write_recipe

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Translate.", "input": "chat", "output": "cat"}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Ciao."}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
LLAMA_TEXT = [{"text": "<s>[INST] Capital of France? [/INST] Paris. </s>"},
              {"text": "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"}]
LLAMA_COLUMNS = [{"prompt": "Capital of France?", "response": "Paris."},
                 {"prompt": "<s>[INST] q [/INST]", "response": "a </s>"}]
COMPLETION = [{"text": "### Alice: hi\n### Bob: hello"}, {"text": "plain text"}]


def recipe_for(folder: Path, data_line: str, **training) -> Path:
    training = {"max_steps": 2, "micro_batch_size": 2, "max_seq_len": 256, **training}
    lines = "\n".join(f"  {key}: {json.dumps(value)}" for key, value in training.items())
    return write_recipe(folder, f"model:\n  init: tiny-llama\ndataset:\n{data_line}\ntraining:\n{lines}\n")


def dataset_recipe(folder: Path, rows: list[dict] | None = None, suffix: str = ".jsonl", raw: bytes | None = None,
                   extra: str = "", **training):
    path = folder / f"data{suffix}"
    if raw is not None:
        path.write_bytes(raw)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return load_recipe(recipe_for(folder, f"  path: {path.name}" + extra, **training))


@pytest.fixture(scope="module")
def tokenizer(shared_home, tmp_path_factory):
    from cloudtune.recipe import Recipe
    from cloudtune.train.model import load_tokenizer

    with module_home(shared_home, tmp_path_factory):
        return load_tokenizer(Recipe.model_validate({"model": {"init": "tiny-llama"}, "dataset": {"hub": "x"}}))


def trained_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each maximal run of tokens that carry a loss, special tokens spelled out."""
    spans, run = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token, "a kept label must be the token itself"
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run)), run.clear()
    if run:
        spans.append(tokenizer.decode(run))
    return spans


# ----------------------------------------------------------------------------------------------
# every format from every file type, auto-detected, the same on both sides


CASES = [("completion", COMPLETION, (".jsonl", ".json", ".csv", ".parquet")),
         ("alpaca", ALPACA, (".jsonl", ".json", ".csv", ".parquet")),
         ("chat", CHAT, (".jsonl", ".json", ".parquet")),  # a list of messages has no CSV spelling
         ("llama2-inst", LLAMA_TEXT, (".jsonl", ".csv", ".parquet")),
         ("llama2-inst", LLAMA_COLUMNS, (".json", ".csv"))]


@pytest.mark.parametrize("fmt, rows, suffix", [(fmt, rows, suffix) for fmt, rows, suffixes in CASES
                                               for suffix in suffixes])
def test_every_format_loads_from_every_file_type(tmp_path, tokenizer, fmt, rows, suffix):
    recipe = dataset_recipe(tmp_path, rows, suffix)
    report = inspect_dataset(recipe)
    assert (report.format, report.rows) == (fmt, len(rows))
    encoded = encode(recipe, tokenizer, load_rows(recipe))
    assert (encoded.format, encoded.rows) == (fmt, len(rows))
    # The CLI counts bytes; the tokenizer makes one token of each literal <s> (3 bytes) and </s> (4 bytes).
    tokens = sum(len(ids) for ids, _ in encoded.examples)
    inner = [token for ids, _ in encoded.examples for token in ids[1:-1]]
    specials = 2 * inner.count(tokenizer.bos_token_id) + 3 * inner.count(tokenizer.eos_token_id)
    assert report.tokens == tokens + specials, "validate must count what the trainer trains"
    for ids, labels in encoded.examples:
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids[1] != tokenizer.bos_token_id and ids[-2] != tokenizer.eos_token_id, "BOS/EOS doubled"
        assert labels[0] == IGNORE and labels[1:] == ids[1:], "without completions_only every token trains"


def test_column_mapping_and_explicit_format(tmp_path, tokenizer):
    rows = [{"q": "Add 2 and 3.", "a": "5"}]
    extra = "\n  format: alpaca\n  columns:\n    instruction: q\n    output: a\n  completions_only: true"
    recipe = dataset_recipe(tmp_path, rows, extra=extra)
    (ids, labels), = encode(recipe, tokenizer, load_rows(recipe)).examples
    assert trained_spans(tokenizer, ids, labels) == ["5</s>"]
    assert tokenizer.decode(ids) == ("<s>" + ALPACA_HEADER.format(ctx="") + "### Instruction:\nAdd 2 and 3.\n\n"
                                     "### Response:\n5</s>")


# ----------------------------------------------------------------------------------------------
# completions only: the exact tokens that carry a loss


def test_completions_only_masks_alpaca_prompts(tmp_path, tokenizer):
    recipe = dataset_recipe(tmp_path, ALPACA, extra="\n  completions_only: true")
    encoded = encode(recipe, tokenizer, load_rows(recipe))
    (ids, labels), (ids2, labels2) = encoded.examples
    prompt = "<s>" + ALPACA_HEADER.format(ctx="") + "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert labels == [IGNORE] * len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + ids[-2:]
    assert tokenizer.decode(ids[-2:]) == "5</s>"
    assert trained_spans(tokenizer, ids2, labels2) == ["cat</s>"]
    assert "### Input:\nchat\n\n" in tokenizer.decode(ids2)
    assert encoded.trained_tokens == 4 + 2


def test_completions_only_trains_every_assistant_turn_of_a_chat(tmp_path, tokenizer):
    recipe = dataset_recipe(tmp_path, CHAT, extra="\n  completions_only: true")
    (ids, labels), (ids2, labels2) = encode(recipe, tokenizer, load_rows(recipe)).examples
    assert tokenizer.decode(ids) == ("<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n"
                                     "<|user|>\nBye\n<|assistant|>\nCiao.\n</s>")
    assert trained_spans(tokenizer, ids, labels) == ["Hello.\n", "Ciao.\n</s>"]
    assert trained_spans(tokenizer, ids2, labels2) == ["4\n</s>"]


def test_chat_template_that_writes_its_own_bos_and_eos(tmp_path, tokenizer):
    """A Llama-2-chat style template: BOS and EOS come from the template, so none are added twice."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
    recipe = dataset_recipe(tmp_path, CHAT[1:], extra="\n  completions_only: true")
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        (ids, labels), = encode(recipe, tokenizer, load_rows(recipe)).examples
    finally:
        tokenizer.chat_template = original
    assert tokenizer.decode(ids) == "<s>[INST] 2+2? [/INST] 4 </s>"
    assert trained_spans(tokenizer, ids, labels) == [" 4 </s>"]


def test_completions_only_masks_llama2_inst_text_and_columns(tmp_path, tokenizer):
    recipe = dataset_recipe(tmp_path, LLAMA_TEXT, extra="\n  completions_only: true")
    (ids, labels), (ids2, labels2) = encode(recipe, tokenizer, load_rows(recipe)).examples
    assert tokenizer.decode(ids) == "<s>[INST] Capital of France? [/INST] Paris.</s>"
    assert trained_spans(tokenizer, ids, labels) == [" Paris.</s>"]
    # Multi-turn: the inner </s> ends the first answer (trained), the inner <s> starts the next prompt.
    assert tokenizer.decode(ids2) == "<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2</s>"
    assert trained_spans(tokenizer, ids2, labels2) == [" a1 </s>", " a2</s>"]

    (tmp_path / "columns").mkdir()
    columns = dataset_recipe(tmp_path / "columns", LLAMA_COLUMNS, extra="\n  completions_only: true")
    (ids, labels), (ids2, labels2) = encode(columns, tokenizer, load_rows(columns)).examples
    assert tokenizer.decode(ids) == "<s>[INST] Capital of France? [/INST] Paris.</s>"
    assert trained_spans(tokenizer, ids, labels) == [" Paris.</s>"]
    assert tokenizer.decode(ids2) == "<s>[INST] q [/INST] a</s>", "markers already in the columns are not doubled"
    assert trained_spans(tokenizer, ids2, labels2) == [" a</s>"]


def test_completions_only_needs_prompts(tmp_path):
    recipe = dataset_recipe(tmp_path, COMPLETION, extra="\n  completions_only: true")
    with pytest.raises(CloudtuneError, match=r"data.jsonl:1: dataset.completions_only needs prompts and answers"):
        inspect_dataset(recipe)


# ----------------------------------------------------------------------------------------------
# truncation


def test_long_rows_are_truncated_and_counted(tmp_path, tokenizer):
    rows = [{"instruction": "x" * 300, "output": "y"}, {"instruction": "short", "output": "z"}]
    recipe = dataset_recipe(tmp_path, rows, extra="\n  completions_only: true", max_seq_len=256)
    encoded = encode(recipe, tokenizer, load_rows(recipe))
    assert encoded.truncated == 1 and len(encoded.examples[0][0]) == 256 and len(encoded.examples[1][0]) < 256
    assert set(encoded.examples[0][1]) == {IGNORE}, "the answer was cut off, so nothing of row 1 trains"
    assert any("1 of 2 rows were longer than max_seq_len=256" in note for note in encoded.notes)
    assert any("1 rows have no answer tokens left" in note for note in encoded.notes)
    report = inspect_dataset(recipe)
    assert report.truncated_rows == 1 and report.longest_row_tokens > 256


# ----------------------------------------------------------------------------------------------
# a hub dataset goes through datasets.load_dataset (here: local files, no network)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def test_hub_dataset_goes_through_load_dataset(tmp_path, tokenizer, datasets_cache):
    from datasets import Dataset

    folder = tmp_path / "saved"
    folder.mkdir()
    Dataset.from_list(ALPACA).to_parquet(str(folder / "train.parquet"))
    recipe = load_recipe(recipe_for(tmp_path, f"  hub: {folder}\n  completions_only: true"))
    encoded = encode(recipe, tokenizer, load_rows(recipe))
    assert (encoded.format, encoded.rows) == ("alpaca", 2)
    assert trained_spans(tokenizer, *encoded.examples[1]) == ["cat</s>"]

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CHAT))
    recipe = load_recipe(recipe_for(tmp_path, f"  hub: json\n  data_files: {tmp_path / 'chat.jsonl'}"))
    encoded = encode(recipe, tokenizer, load_rows(recipe))
    assert (encoded.format, encoded.rows) == ("chat", 2)

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": ""}\n')
    recipe = load_recipe(recipe_for(tmp_path, f"  hub: json\n  data_files: [{tmp_path / 'bad.jsonl'}]"))
    with pytest.raises(CloudtuneError, match=r"bad.jsonl'\] train row 1: column 'text' is empty"):
        encode(recipe, tokenizer, load_rows(recipe))

    recipe = load_recipe(recipe_for(tmp_path, f"  hub: {tmp_path / 'nothing-here'}"))
    with pytest.raises(CloudtuneError, match="could not be loaded"):
        load_rows(recipe)


def test_data_files_need_hub(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(CloudtuneError, match="dataset.data_files: data_files goes with `hub`"):
        load_recipe(recipe_for(tmp_path, "  path: d.jsonl\n  data_files: d.jsonl"))


# ----------------------------------------------------------------------------------------------
# bad data: one clear error naming the row and column, exit 2, before any training


BAD_DATA = [
    ("missing column", ".jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     r"data.jsonl:2: column 'output' is missing"),
    ("empty value", ".jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"text": "   "}\n',
     r"data.jsonl:3: column 'text' is empty"),
    ("wrong type", ".json", b'[{"text": "fine"}, {"text": 5}]',
     r"data.json item 1: column 'text' should be text, got int"),
    ("non-UTF-8", ".jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"data.jsonl:2: not UTF-8 text"),
    ("invalid JSON line", ".jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"data.jsonl:3: not valid JSON"),
    ("empty CSV field", ".csv", b"instruction,output\na,b\nc,\n", r"data.csv:3: column 'output' is empty"),
    ("chat without an answer", ".jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n',
     r"data.jsonl:1: column 'messages': the last message should be the assistant's answer"),
    ("no rows", ".jsonl", b"\n\n", r"the dataset has no rows"),
]


@pytest.mark.parametrize("name, suffix, raw, message", BAD_DATA, ids=[case[0] for case in BAD_DATA])
def test_bad_data_is_a_clear_error_on_both_sides(tmp_path, capsys, name, suffix, raw, message):
    recipe = dataset_recipe(tmp_path, suffix=suffix, raw=raw).source
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(message, result.output), result.output

    out = tmp_path / "out"
    assert train_main([str(recipe), "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "metrics.jsonl").exists(), "training started on bad data"


def test_train_entrypoint_exits_2_on_bad_data(tmp_path):
    recipe = dataset_recipe(tmp_path, suffix=".jsonl", raw=b'{"text": "ok"}\n{"text": 7}\n').source
    result = subprocess.run([sys.executable, "-m", "cloudtune.train", str(recipe), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "data.jsonl:2: column 'text' should be text, got int" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# packing and batching


def test_pack_fills_rows_without_overflow_and_deterministically():
    import random

    lengths = [random.Random(7).randint(1, 100) for _ in range(500)]
    rows = pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= sum(lengths) / 128 * 1.1 + 1, "packing wastes more than 10 %"
    assert rows == pack(lengths, 128)


def test_batches_resume_mid_epoch_exactly(tmp_path, tokenizer):
    rows = [{"text": "x" * n} for n in range(1, 60)]
    recipe = dataset_recipe(tmp_path, rows, max_seq_len=64)
    encoded = encode(recipe, tokenizer, load_rows(recipe))
    batcher = Batcher(encoded, micro_batch_size=3, max_seq_len=64, packing=True, seed=5, pad_id=2)
    whole = list(batcher.epoch(1))
    tail = list(batcher.epoch(1, start=4))
    assert len(tail) == len(whole) - 4
    for (a, tokens_a), (b, tokens_b) in zip(whole[4:], tail, strict=True):
        assert tokens_a == tokens_b and all(a[k].equal(b[k]) for k in a)
    other_epoch = [batch["input_ids"] for batch, _ in batcher.epoch(2)]
    assert any(not x.equal(y["input_ids"]) for x, (y, _) in zip(other_epoch, whole, strict=True)), \
        "epochs are not reshuffled"
    first, _tokens = whole[0]
    assert "attention_mask" not in first  # packed rows need position ids only
    assert sum(tokens for _, tokens in whole) == sum(len(ids) for ids, _ in encoded.examples), \
        "an epoch must hold every document exactly once"
