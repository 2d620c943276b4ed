"""A finished run's model, loaded from its outputs, and text generated from it the way training saw text.

`cloudtune try`, `cloudtune export` and the samples written after training all go through here: the
prompt is rendered by the run's format (and chat template, dataset.chat_template included), tokenized in
one piece with BOS added as the training data had it, and generated greedily unless a temperature is set.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import formats
from ..errors import CloudtuneError
from ..recipe import Recipe
from .data import chat_renderer


@dataclass
class Trained:
    model: object
    tokenizer: object
    format: str  # the format the training data was read in (run.json), so prompts are rendered alike
    run: dict

    def render(self, prompt: str) -> str:
        return formats.prompt_only(self.format, prompt, chat_renderer(self.tokenizer))


def saved_recipe(output_dir: Path) -> Recipe:
    import yaml

    recipe_file = output_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise CloudtuneError(f"{output_dir}: no recipe.yaml to find the base model the adapter goes on.",
                             "Outputs of cloudtune before 0.x lack it; load the adapter onto its base by hand.")
    return Recipe.model_validate(yaml.safe_load(recipe_file.read_text()))


def load_trained(output_dir: Path, device: torch.device | None = None) -> Trained:
    """The trained model of a run's outputs: the merged model when one was saved, else the base with the
    adapter merged in (as export.merge makes it), else the fully trained model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from .model import load_merged, with_recipe_chat_template

    transformers_logging.disable_progress_bar()  # a bar per load would interleave with the answers
    run = json.loads((output_dir / "run.json").read_text())
    weights = output_dir / (run.get("merged_dir") or run["weights_dir"])
    recipe = saved_recipe(output_dir) if weights.name == "adapter" or (output_dir / "recipe.yaml").is_file() \
        else None
    if weights.name == "adapter":
        model = load_merged(recipe.model, weights)
    else:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(weights)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if recipe is not None:
        with_recipe_chat_template(tokenizer, recipe.dataset)
    model.eval()
    if device is not None:
        model.to(device)
    return Trained(model=model, tokenizer=tokenizer, format=run.get("format") or "completion", run=run)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt as data.tokenize makes them: one piece, BOS first unless it is there."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def streamer(tokenizer, write: Callable[[str], None]):
    """A transformers streamer that hands each finished piece of text to `write` instead of printing it."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model, tokenizer, text: str, *, max_new_tokens: int, temperature: float = 0.0,
             write: Callable[[str], None] | None = None, autocast=None) -> str:
    """The model's answer to an already rendered prompt: greedy at temperature 0 (the same every time),
    sampled above it; streamed piece by piece to `write` when given."""
    ids = prompt_ids(tokenizer, text)
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad(), autocast or nullcontext():
        generated = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                   max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                   streamer=streamer(tokenizer, write) if write else None, **sampling)
    return tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
