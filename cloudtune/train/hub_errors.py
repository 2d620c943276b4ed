"""What went wrong when the base model could not be loaded, said as the recipe's field, not as the
chain of huggingface_hub and transformers exceptions (dozens of lines that bury the one fact that matters)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CloudtuneError
from ..recipe import ModelSpec

HINT = ("Check model.name (owner/name on the hub, or a local folder holding config.json and the weights). "
        "Without network, download it first (`hf download NAME`) and point model.name at that folder; gated "
        "and private models need HF_TOKEN in the recipe's secrets.")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def problem_of(exc: BaseException, spec: ModelSpec) -> str | None:
    """The model loading failure in a few words, or None when `exc` is not one (then it stays a crash)."""
    from huggingface_hub import errors

    for cause in _chain(exc):
        # subclasses before their bases: a gated repository is a RepositoryNotFoundError too
        if isinstance(cause, errors.GatedRepoError):
            return "a gated model: accept its licence on the hub, and pass an HF_TOKEN that has access"
        if isinstance(cause, errors.RepositoryNotFoundError):
            return "no such model on the hub (or a private one, which needs HF_TOKEN)"
        if isinstance(cause, errors.RevisionNotFoundError):
            return f"model.revision '{spec.revision}' does not exist in it"
        if isinstance(cause, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            return "not in this machine's Hugging Face cache, and the hub cannot be reached from here"
        if isinstance(cause, errors.HFValidationError):
            return "neither a folder on this machine nor a hub id (owner/name)"
        if isinstance(cause, errors.EntryNotFoundError) or (
                isinstance(cause, OSError) and "does not appear to have a file named" in str(cause)) or (
                isinstance(cause, ValueError) and "Unrecognized model in" in str(cause)):
            return "it lacks a file the model needs (config.json, tokenizer or weights): is it a causal LM?"
        if isinstance(cause, ValueError) and "Couldn't instantiate the backend tokenizer" in str(cause):
            return "it holds no tokenizer files (tokenizer.json, or a slow tokenizer's) that can be loaded"
    return None


@contextmanager
def loading_model(spec: ModelSpec, source: str) -> Iterator[None]:
    """Around every load of the base model, its config or its tokenizer from `source`."""
    try:
        yield
    except CloudtuneError:
        raise
    except Exception as exc:
        problem = problem_of(exc, spec)
        if problem is None:
            raise
        raise CloudtuneError(f"model.name '{source}' cannot be loaded: {problem}.", HINT) from None
