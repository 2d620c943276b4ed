"""Packed rows do not attend across documents: each document's logits in a packed batch equal its
logits when run alone, and the packed loss equals the loss over the documents one by one."""
from __future__ import annotations

import pytest
import torch

from cloudtune.recipe import Recipe
from cloudtune.train import attention as attention_lib
from cloudtune.train import model as model_lib
from cloudtune.train.data import IGNORE, Batcher, Encoded

from .conftest import module_home

LENGTHS = [(37, 12, 50), (23, 61)]  # documents per packed row; the second row is padded to the first's width


@pytest.fixture(scope="module")
def tiny_model(shared_home, tmp_path_factory):
    with module_home(shared_home, tmp_path_factory):
        recipe = Recipe.model_validate({"model": {"init": "tiny-llama"}, "dataset": {"hub": "unused"}})
        return model_lib.load_base(recipe, torch.device("cpu")).eval()


def documents() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, 259, (n - 1,), generator=generator).tolist() for row in LENGTHS for n in row]


def packed_batch(docs: list[list[int]], document_offsets: bool = False) -> dict:
    encoded = Encoded(examples=[(ids, [IGNORE] + ids[1:]) for ids in docs], format="completion")
    batcher = Batcher(encoded, micro_batch_size=2, max_seq_len=128, packing=True, seed=0, pad_id=2,
                      document_offsets=document_offsets)
    rows, at = [], 0
    for row in LENGTHS:
        rows.append(list(range(at, at + len(row))))
        at += len(row)
    batch, tokens = batcher.collate(rows)
    assert tokens == sum(map(len, docs))
    return batch


def offsets_of(position_ids: torch.Tensor) -> dict:
    offsets, longest = attention_lib.document_offsets(position_ids)
    return dict(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "documents"])
def test_packed_documents_do_not_see_each_other(tiny_model, attention):
    by_offsets = attention == attention_lib.DOCUMENT_ATTENTION
    tiny_model.set_attn_implementation(attention_lib.implementation(attention, torch.device("cpu")))
    docs = documents()
    batch = packed_batch(docs, document_offsets=by_offsets)
    assert "attention_mask" not in batch  # the boundaries come from the position ids (or offsets) alone
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if by_offsets:
        # 5 documents and the second row's padding; the longest is the 61-token document
        assert batch["cu_seq_lens_q"].tolist() == [0, 37, 49, 99, 122, 183, 198] and batch["max_length_q"] == 61
    with torch.no_grad():
        packed = tiny_model(**inputs).logits
        at, d = 0, 0
        for r, row in enumerate(LENGTHS):
            at = 0
            for n in row:
                alone = tiny_model(input_ids=torch.tensor([docs[d]])).logits[0]
                torch.testing.assert_close(packed[r, at:at + n], alone, atol=2e-5, rtol=1e-4)
                at, d = at + n, d + 1

        # The check can fail: without the position restarts, later documents see earlier ones.
        leaky_positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky_inputs = offsets_of(leaky_positions) if by_offsets else {}
        leaky = tiny_model(input_ids=batch["input_ids"], position_ids=leaky_positions, **leaky_inputs).logits
        second = tiny_model(input_ids=torch.tensor([docs[1]])).logits[0]
        assert (leaky[0, 37:37 + 12] - second).abs().max() > 1e-2
    tiny_model.set_attn_implementation("sdpa")


def test_packed_loss_is_the_token_mean_over_documents(tiny_model):
    docs = documents()
    batch = packed_batch(docs)
    n_items = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert n_items == sum(len(doc) - 1 for doc in docs), "only each document's own next tokens carry a loss"
    with torch.no_grad():
        packed_loss = tiny_model(**batch, num_items_in_batch=n_items).loss
        total = sum(tiny_model(input_ids=torch.tensor([doc]), labels=torch.tensor([doc])).loss * (len(doc) - 1)
                    for doc in docs)
    torch.testing.assert_close(packed_loss, total / n_items, atol=1e-5, rtol=1e-5)


def test_partial_checkpointing_recomputes_the_first_layers_and_changes_no_gradient(shared_home, tmp_path_factory):
    with module_home(shared_home, tmp_path_factory):
        recipe = Recipe.model_validate({"model": {"init": "tiny-llama"}, "dataset": {"hub": "unused"},
                                        "lora": {"dropout": 0.0}})
        cpu = torch.device("cpu")
        plain = model_lib.prepare_for_training(recipe, model_lib.load_base(recipe, cpu), 0, autocast=False)
        partial = model_lib.prepare_for_training(recipe, model_lib.load_base(recipe, cpu), 1, autocast=False)
    assert [layer.gradient_checkpointing for layer in model_lib.decoder_layers(partial)] == [True, False]
    assert not any(layer.gradient_checkpointing for layer in model_lib.decoder_layers(plain))
    batch = packed_batch(documents())
    attention_calls = []
    for index, layer in enumerate(model_lib.decoder_layers(partial)):
        # the layer's own hook would not see the recomputation, which stops early once it has what backward needs
        layer.self_attn.register_forward_hook(lambda *_, index=index: attention_calls.append(index))
    for model in (plain, partial):
        model.train()
        model.load_state_dict(plain.state_dict())  # the same LoRA initialisation
        model(**batch, num_items_in_batch=100).loss.backward()
    assert attention_calls == [0, 1, 0], "only the checkpointed first layer runs again in backward"
    for (name, mine), theirs in zip(partial.named_parameters(), plain.parameters(), strict=True):
        if mine.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=name)
