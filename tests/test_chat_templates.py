"""Chat templates of current model families: completions_only trains exactly the assistant turns.

Each tokenizer is the tiny byte-level one with its family's special tokens added as single tokens and
its family's template, so a decoded text shows every marker, and each trained span is exactly one
assistant turn with its end-of-turn marker. No training here.
"""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from cloudtune import chat_templates
from cloudtune.cli import cli
from cloudtune.train.data import encode, load_rows

from .conftest import write_recipe
from .test_train_data import dataset_recipe, trained_spans

SYSTEM_MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao."}]}
ONE_TURN = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}

# Qwen2.5's own template adds a default system prompt when the conversation has none.
QWEN25 = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba "
          "Cloud. You are a helpful assistant.<|im_end|>\\n' }}{% endif %}" + chat_templates.CHATML)


@pytest.fixture(scope="module")
def byte_tokenizer():
    from cloudtune.train.model import build_byte_tokenizer

    return build_byte_tokenizer


def family_tokenizer(build, template: str, bos: str | None, eos: str, specials: list[str]):
    tokenizer = build()
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, eos
    tokenizer.chat_template = template
    return tokenizer


FAMILIES = {
    "llama3": dict(
        template=chat_templates.LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>",
        specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        text=("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nCiao.<|eot_id|>"),
        spans=["Hello.<|eot_id|>", "Ciao.<|eot_id|>"],
        one_turn=("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>", ["4<|eot_id|>"])),
    "qwen2.5": dict(
        template=QWEN25, bos=None, eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>"],
        text=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\nCiao.<|im_end|>\n"),
        spans=["Hello.<|im_end|>\n", "Ciao.<|im_end|>\n"],
        one_turn=("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                  "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
                  ["4<|im_end|>\n"])),
    "chatml (qwen3)": dict(
        template=chat_templates.CHATML, bos=None, eos="<|im_end|>", specials=["<|im_start|>", "<|im_end|>"],
        text=("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\nCiao.<|im_end|>\n"),
        spans=["Hello.<|im_end|>\n", "Ciao.<|im_end|>\n"],
        one_turn=("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n", ["4<|im_end|>\n"])),
    "mistral": dict(
        template=chat_templates.MISTRAL, bos="<s>", eos="</s>", specials=[],
        text="<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Bye [/INST] Ciao.</s>",
        spans=[" Hello.</s>", " Ciao.</s>"],
        one_turn=("<s>[INST] 2+2? [/INST] 4</s>", [" 4</s>"])),
    "gemma": dict(
        template=chat_templates.GEMMA, bos="<bos>", eos="<end_of_turn>",
        specials=["<bos>", "<start_of_turn>", "<end_of_turn>"],
        # no system role: the system prompt opens the first user turn, untrained
        text=("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nCiao.<end_of_turn>\n"),
        spans=["Hello.<end_of_turn>\n", "Ciao.<end_of_turn>\n"],
        one_turn=("<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
                  ["4<end_of_turn>\n"])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_completions_only_trains_exactly_the_assistant_turns(family, tmp_path, byte_tokenizer):
    spec = FAMILIES[family]
    tokenizer = family_tokenizer(byte_tokenizer, spec["template"], spec["bos"], spec["eos"], spec["specials"])
    recipe = dataset_recipe(tmp_path, [SYSTEM_MULTI_TURN, ONE_TURN], extra="\n  completions_only: true")
    (ids, labels), (ids2, labels2) = encode(recipe, tokenizer, load_rows(recipe)).examples
    assert tokenizer.decode(ids) == spec["text"], "BOS and EOS from the template, none added twice"
    assert trained_spans(tokenizer, ids, labels) == spec["spans"]
    assert (tokenizer.decode(ids2), trained_spans(tokenizer, ids2, labels2)) == spec["one_turn"]
    for marker in spec["specials"]:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1, "a family's token is one token"


def test_mistral_and_gemma_refuse_what_their_format_cannot_say(tmp_path, byte_tokenizer):
    from cloudtune.errors import CloudtuneError

    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}
    late_system = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                {"role": "assistant", "content": "c"}]}
    for name, row, said in (("mistral", two_users, "alternate user and assistant"),
                            ("gemma", late_system, "Gemma has no system role")):
        spec = FAMILIES[name]
        tokenizer = family_tokenizer(byte_tokenizer, spec["template"], spec["bos"], spec["eos"], spec["specials"])
        (tmp_path / name).mkdir()
        recipe = dataset_recipe(tmp_path / name, [row])
        with pytest.raises(CloudtuneError, match=f"data.jsonl:1: the chat template rejected column 'messages': "
                                                 f".*{said}"):
            encode(recipe, tokenizer, load_rows(recipe))


def test_a_named_template_in_the_recipe_replaces_the_models_own_in_training(tmp_path):
    from cloudtune.train.model import load_tokenizer

    recipe = dataset_recipe(tmp_path, [ONE_TURN], extra="\n  completions_only: true\n  chat_template: chatml")
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.chat_template == chat_templates.CHATML
    (ids, labels), = encode(recipe, tokenizer, load_rows(recipe)).examples
    assert tokenizer.decode(ids) == "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n</s>"
    assert trained_spans(tokenizer, ids, labels) == ["4<|im_end|>\n</s>"]


def test_a_jinja_template_in_the_recipe_is_used_as_written(tmp_path):
    from cloudtune.train.model import load_tokenizer

    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    recipe = dataset_recipe(tmp_path, [ONE_TURN], extra="\n  chat_template: " + json.dumps(jinja))
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.chat_template == jinja
    (ids, _), = encode(recipe, tokenizer, load_rows(recipe)).examples
    assert tokenizer.decode(ids) == "<s>[user] 2+2?\n[assistant] 4\n</s>"


@pytest.mark.parametrize(("value", "said"), [
    ("'{% for m in messages %}{{ m.content }'", r"dataset\.chat_template: .*is not valid Jinja \(line 1\)"),
    ("'{{ messages[0].content | no_such_filter }}'", r"dataset\.chat_template: .*is not valid Jinja"),
    ("llama-3", r"dataset\.chat_template: .*'llama-3' is neither a built-in template \(llama3, chatml, mistral, "
                r"gemma\) nor Jinja text .*did you mean llama3\?"),
    ("'{{ raise_exception(\"no\") }}'", r"dataset\.chat_template: .*refused a plain conversation: no"),
])
def test_a_bad_template_is_refused_naming_the_field_and_line(tmp_path, value, said):
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                         '{"role": "assistant", "content": "b"}]}\n')
    recipe = write_recipe(tmp_path, "model:\n  init: tiny-llama\ndataset:\n  path: data.jsonl\n"
                                    f"  chat_template: {value}\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(said, " ".join(result.output.split())), result.output
    assert ":5:" in result.output or "line 5" in result.output, "the recipe's line"


def test_validate_renders_with_the_recipes_template_and_refuses_what_it_refuses(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})
        + "\n")
    recipe = write_recipe(tmp_path, "model:\n  init: tiny-llama\ndataset:\n  path: data.jsonl\n"
                                    "  chat_template: mistral\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "data.jsonl:1: the chat template rejected column 'messages'" in " ".join(result.output.split())
    assert "alternate user and assistant" in " ".join(result.output.split())
