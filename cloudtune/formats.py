"""Dataset formats: detect which one a row is in, check it, and render it to (prompt, answer) text.

Pure Python on purpose: the CLI checks and counts data with this before any GPU is rented, and the
trainer renders with the very same functions, so what was counted is what gets trained.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .recipe import ColumnMap

ALPACA_HEADER = ("Below is an instruction that describes a task{ctx}. "
                 "Write a response that appropriately completes the request.\n\n")

# A chat rendering for tokenizers that carry no chat template (and for counting on the CLI side).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class RowError(ValueError):
    """A row that cannot be trained on; `column` names the culprit when there is one."""

    def __init__(self, message: str, column: str | None = None):
        super().__init__(message)
        self.column = column


def detect_format(row: Mapping[str, Any], columns: ColumnMap) -> str:
    keys = set(row)
    if columns.messages in keys:
        return "chat"
    if columns.instruction in keys and columns.output in keys:
        return "alpaca"
    if columns.prompt in keys and columns.response in keys:
        return "llama2-inst"
    if columns.text in keys:
        text = row[columns.text]
        return "llama2-inst" if isinstance(text, str) and "[/INST]" in text else "completion"
    raise RowError(f"cannot tell the format from its columns ({', '.join(sorted(map(str, keys))) or 'none'}); "
                   f"expected '{columns.text}', '{columns.instruction}'+'{columns.output}', "
                   f"'{columns.messages}' or '{columns.prompt}'+'{columns.response}'. "
                   "Set dataset.format and dataset.columns in the recipe.")


def _text(row: Mapping[str, Any], column: str, required: bool = True) -> str:
    if column not in row or row[column] is None:
        if required:
            raise RowError(f"column '{column}' is missing", column)
        return ""
    value = row[column]
    if not isinstance(value, str):
        raise RowError(f"column '{column}' should be text, got {type(value).__name__}", column)
    if required and not value.strip():
        raise RowError(f"column '{column}' is empty", column)
    return value


def _strip_llama_markers(text: str) -> str:
    # BOS/EOS come from the tokenizer; literal markers in the data would double them.
    return text.replace("<s>", "").replace("</s>", "").strip()


def check_messages(row: Mapping[str, Any], column: str) -> list[dict]:
    messages = row.get(column)
    if messages is None:
        raise RowError(f"column '{column}' is missing", column)
    if not isinstance(messages, list) or not messages:
        raise RowError(f"column '{column}' should be a non-empty list of {{role, content}}", column)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise RowError(f"column '{column}' item {i} should be {{role: text, content: text}}", column)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"column '{column}': the last message should be the assistant's answer", column)
    return messages


ChatRenderer = Callable[[list[dict], bool], str]


def render(row: Mapping[str, Any], fmt: str, columns: ColumnMap, chat: ChatRenderer) -> tuple[str, str]:
    """Return (prompt, answer). Training on completions only masks the prompt part."""
    if fmt == "completion":
        return "", _text(row, columns.text)
    if fmt == "alpaca":
        instruction = _text(row, columns.instruction)
        context = _text(row, columns.input, required=False)
        answer = _text(row, columns.output)
        prompt = ALPACA_HEADER.format(ctx=", paired with an input that provides further context" if context else "")
        prompt += f"### Instruction:\n{instruction}\n\n"
        if context:
            prompt += f"### Input:\n{context}\n\n"
        return prompt + "### Response:\n", answer
    if fmt == "llama2-inst":
        if columns.prompt in row and columns.response in row:
            prompt = _strip_llama_markers(_text(row, columns.prompt))
            return f"[INST] {prompt} [/INST] ", _strip_llama_markers(_text(row, columns.response))
        text = _strip_llama_markers(_text(row, columns.text))
        if "[/INST]" not in text:
            raise RowError(f"column '{columns.text}' has no [INST] ... [/INST] prompt", columns.text)
        head, answer = text.split("[/INST]", 1)
        return head + "[/INST] ", answer.strip()
    if fmt == "chat":
        messages = check_messages(row, columns.messages)
        prompt = chat(messages[:-1], True)
        full = chat(messages, False)
        if not full.startswith(prompt):
            return "", full  # a template that rewrites history: fall back to training on everything
        return prompt, full[len(prompt):]
    raise RowError(f"unknown format '{fmt}'")


def fallback_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """FALLBACK_CHAT_TEMPLATE without jinja, for the CLI side."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")
