"""Chat templates a recipe can name in `dataset.chat_template` instead of the model's own, and the check
that a template given as Jinja text compiles and renders before anything is rented.

Each built-in follows its family's published prompt format, written so that the rendering of a shorter
conversation is a prefix of the longer one: formats._chat_segments needs that to find the assistant
turns, which is what completions_only trains. Every assistant turn ends with its family's end-of-turn
marker inside the turn, so the model learns to stop.

Jinja only, no torch: the CLI validates recipes with this on a laptop install.
"""
from __future__ import annotations

import difflib

# Llama 3 / 3.1 / 3.2 Instruct: header tokens around each role, <|eot_id|> ends every turn.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# ChatML, as Qwen2.5 and Qwen3 (without thinking) write it: <|im_start|>role ... <|im_end|>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral Instruct: [INST] user [/INST] answer</s>; roles must alternate. The system prompt opens the
# first [INST] (Mistral's newer templates put it before the last one, which rewrites earlier turns).
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Mistral conversations alternate user and assistant, starting with the user') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content']"
    " + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Gemma 2 / 3: <start_of_turn>user|model ... <end_of_turn>. Gemma has no system role; as Gemma 3's own
# template does, the system prompt is folded into the first user turn.
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for message in turns %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('Gemma has no system role: give the system prompt as the first message only') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

BUILT_IN = {"llama3": LLAMA3, "chatml": CHATML, "mistral": MISTRAL, "gemma": GEMMA}

# What a template is tried on when a recipe is checked: a system prompt and two turns.
TRIAL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Ciao."}]


def resolve(value: str) -> str:
    """The Jinja text of dataset.chat_template: a built-in's by its name, else the value itself."""
    return BUILT_IN.get(value, value)


def looks_like_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


class TemplateError(ValueError):
    pass


def _raise(message: str):
    raise TemplateError(message)


def render(template: str, messages: list[dict], add_generation_prompt: bool, **special_tokens: str) -> str:
    """Render as transformers' apply_chat_template does: a sandbox, trim_blocks and lstrip_blocks on."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


def problem(value: str) -> str | None:
    """Why dataset.chat_template cannot be used, or None: an unknown name, Jinja that does not compile, or
    a template that fails on an ordinary conversation."""
    if not looks_like_jinja(value):
        if value in BUILT_IN:
            return None
        close = difflib.get_close_matches(value, BUILT_IN, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        return (f"'{value[:80]}' is neither a built-in template ({', '.join(BUILT_IN)}) nor Jinja text "
                f"({{{{ ... }}}}, {{% ... %}}){hint}")
    from jinja2 import TemplateError as JinjaError

    for trial in (TRIAL, TRIAL[1:]):
        try:
            render(value, trial, True, bos_token="<s>", eos_token="</s>")
        except TemplateError as exc:
            if trial is TRIAL:  # a template may refuse a system prompt: it is checked without one next
                continue
            return f"the template refused a plain conversation: {exc}"
        except JinjaError as exc:
            where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
            return f"is not valid Jinja{where}: {exc.message or type(exc).__name__}"
        except Exception as exc:  # noqa: BLE001 - any error of the template's own code is the template's
            return f"the template fails on a plain conversation: {type(exc).__name__}: {exc}"
        else:
            return None
    return None
