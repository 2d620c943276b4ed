"""Dataset formats: detect which one a row is in, check it, and render it to prompt/answer text pieces.

Pure Python on purpose: the CLI checks and counts data with this before any GPU is rented, and the
trainer renders with the very same functions, so what was counted is what gets trained.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .inputs import SURROGATE
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


LLAMA_PROMPT_END = "[/INST]"
# The next turn of a multi-turn llama2-inst text starts at `[INST]`, optionally after a `<s>`.
LLAMA_NEXT_TURN = re.compile(r"(?:<s>\s*)?\[INST\]")

Segment = tuple[str, bool]
"""A piece of a rendered document and whether it is an answer (trained on with completions_only)."""


def _strip_llama_markers(text: str) -> str:
    # BOS/EOS come from the tokenizer; literal markers in the data would double them.
    return text.replace("<s>", "").replace("</s>", "").strip()


def _llama_text_segments(text: str, column: str) -> list[Segment]:
    """`<s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>` -> prompt/answer segments per turn.

    Only the outer `<s>`/`</s>` go (the tokenizer adds those); the inner ones stay, so the model
    learns to end each answer and the next turn starts as it will at inference.
    """
    text = text.strip()
    text = text[len("<s>"):].lstrip() if text.startswith("<s>") else text
    text = text[: -len("</s>")].rstrip() if text.endswith("</s>") else text
    if LLAMA_PROMPT_END not in text:
        raise RowError(f"column '{column}' has no [INST] ... [/INST] prompt", column)
    segments: list[Segment] = []
    at = 0
    while at < len(text):
        end = text.find(LLAMA_PROMPT_END, at)
        if end < 0:
            raise RowError(f"column '{column}' has text after the last answer that is not an "
                           f"[INST] ... [/INST] prompt", column)
        prompt_end = end + len(LLAMA_PROMPT_END)
        next_turn = LLAMA_NEXT_TURN.search(text, prompt_end)
        answer_end = next_turn.start() if next_turn else len(text)
        answer = text[prompt_end:answer_end]
        if not _strip_llama_markers(answer):
            raise RowError(f"column '{column}' has an [INST] prompt with an empty answer", column)
        segments += [(text[at:prompt_end], False), (answer, True)]
        at = answer_end
    return segments


def check_messages(row: Mapping[str, Any], column: str) -> list[dict]:
    messages = row.get(column)
    if messages is None:
        raise RowError(f"column '{column}' is missing", column)
    if not isinstance(messages, list) or not messages:
        raise RowError(f"column '{column}' should be a non-empty list of {{role, content}}", column)
    if len(messages) > MAX_MESSAGES:
        raise RowError(f"column '{column}' holds {len(messages):,} messages; split conversations longer than "
                       f"{MAX_MESSAGES}", column)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise RowError(f"column '{column}' item {i} should be {{role: text, content: text}}", column)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"column '{column}': the last message should be the assistant's answer", column)
    return messages


ChatRenderer = Callable[[list[dict], bool], str]
# Each answer is found by rendering the conversation up to it (see _chat_segments), so a row costs the
# square of its length: 8,000 messages took 20 s, a hostile 20,000 minutes. Real conversations are far
# shorter than this, and one this long would not fit max_seq_len anyway.
MAX_MESSAGES = 512


def _chat_segments(messages: list[dict], chat: ChatRenderer) -> list[Segment]:
    """Every assistant turn is an answer; everything the template puts around it is prompt.

    Rendering the conversation up to each turn and taking differences needs a template whose output
    for a shorter conversation is a prefix of the longer one. Templates that rewrite earlier turns
    (e.g. dropping old reasoning) do not allow that: then the whole text is one unsplit segment.
    """
    segments: list[Segment] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat(messages[:k], True) if k else done
        full = chat(messages[: k + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return [(chat(messages, False), True)]
        if len(prompt) > len(done):
            segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return segments


def segments(row: Mapping[str, Any], fmt: str, columns: ColumnMap, chat: ChatRenderer) -> list[Segment]:
    """Render one row to text, split into prompt and answer pieces (completions_only trains on answers)."""
    if fmt == "completion":
        return [(_text(row, columns.text), True)]
    if fmt == "alpaca":
        instruction = _text(row, columns.instruction)
        context = _text(row, columns.input, required=False)
        answer = _text(row, columns.output)
        prompt = ALPACA_HEADER.format(ctx=", paired with an input that provides further context" if context else "")
        prompt += f"### Instruction:\n{instruction}\n\n"
        if context:
            prompt += f"### Input:\n{context}\n\n"
        return [(prompt + "### Response:\n", False), (answer, True)]
    if fmt == "llama2-inst":
        if columns.prompt in row and columns.response in row:
            prompt = _strip_llama_markers(_text(row, columns.prompt))
            answer = _strip_llama_markers(_text(row, columns.response))
            if not answer:
                raise RowError(f"column '{columns.response}' is empty", columns.response)
            if not (prompt.startswith("[INST]") and prompt.endswith(LLAMA_PROMPT_END)):
                prompt = f"[INST] {prompt} {LLAMA_PROMPT_END}"
            return [(prompt, False), (f" {answer}", True)]
        return _llama_text_segments(_text(row, columns.text), columns.text)
    if fmt == "chat":
        messages = check_messages(row, columns.messages)
        try:
            return _chat_segments(messages, chat)
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. roles must alternate) is row data
            raise RowError(f"the chat template rejected column '{columns.messages}': {exc}", columns.messages) from None
    raise RowError(f"unknown format '{fmt}'")


def check_segments(pieces: list[Segment], fmt: str, completions_only: bool) -> None:
    """What training needs from a rendered row: some text to learn, and a prompt to mask if asked to."""
    for text, _trained in pieces:
        # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer (or UTF-8) can encode
        found = SURROGATE.search(text)
        if found:
            raise RowError(f"the text holds a lone surrogate U+{ord(found.group()):04X} at character "
                           f"{found.start() + 1} (a \\u escape that is not Unicode)")
    if not any(text.strip() for text, trained in pieces if trained):
        raise RowError("the row has no answer text to train on")
    if completions_only and all(trained for _text, trained in pieces):
        if fmt == "chat":
            raise RowError("dataset.completions_only: the tokenizer's chat template rewrites earlier turns, so "
                           "answers cannot be told apart from prompts; set completions_only: false")
        raise RowError(f"dataset.completions_only needs prompts and answers, but format '{fmt}' has only text; "
                       "use alpaca, chat or llama2-inst data, or set completions_only: false")


def prompt_only(fmt: str, text: str, chat: ChatRenderer) -> str:
    """A user's prompt rendered the way the format renders prompts, ready for the model to answer."""
    if fmt == "chat":
        return chat([{"role": "user", "content": text}], True)
    if fmt == "alpaca":
        return segments({"instruction": text, "output": "-"}, fmt, ColumnMap(), chat)[0][0]
    if fmt == "llama2-inst":
        return f"[INST] {text.strip()} {LLAMA_PROMPT_END}"
    return text


def fallback_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """FALLBACK_CHAT_TEMPLATE without jinja, for the CLI side."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")
