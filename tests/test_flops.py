"""The FLOP count behind MFU (bench/train_speed.py), against a count by hand on a small config."""
from __future__ import annotations

import pytest

from cloudtune.planning.flops import attention_span, model_flops_per_token
from cloudtune.planning.memory import ModelShape

# hidden 8, 2 heads of 4 (q and o 8 wide), 1 kv head (k and v 4 wide), MLP 16, 2 layers, vocab 10
SMALL = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10)


def test_attention_span_weights_each_document_by_its_tokens():
    # documents of 2 and 4 tokens: 2²/2 + 4²/2 = 10 query-key pairs over 6 tokens
    assert attention_span([2, 4]) == pytest.approx(10 / 6)
    assert attention_span([]) == 0.0


def test_model_flops_of_a_frozen_base_and_of_full_fine_tuning_by_hand():
    # per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate, up, down 8·16 each = 576; 2 layers + the 10×8 head = 1232
    matmul_weights = 2 * (64 + 32 + 32 + 64 + 3 * 128) + 80
    assert matmul_weights == 1232
    # attention over the documents [2, 4]: 10 query-key pairs, each a q·k and a p·v of 8 wide = 32 FLOPs
    # per layer forward, backward twice that, 2 layers, over 6 tokens
    attention = 10 * 32 * 3 * 2 / 6
    assert attention == 320
    span = attention_span([2, 4])
    # a rank-1 adapter on q alone: A 1×8 and B 8×1
    adapter = 16
    assert model_flops_per_token(SMALL, "lora", span, adapter) == pytest.approx(
        2 * matmul_weights + 2 * matmul_weights + attention + 6 * adapter)  # forward, input gradient, adapters
    assert model_flops_per_token(SMALL, "qlora", span, adapter) == pytest.approx(4928 + 320 + 96)
    # every weight trains: its gradient costs another 2·N; no separate adapter term
    assert model_flops_per_token(SMALL, "full", span) == pytest.approx(6 * 1232 + 320)
