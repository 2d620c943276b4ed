"""GPU memory model for a fine-tune: what a micro-batch costs, with and without checkpointing.

Used on both sides: the planner marks which GPUs fit before anything is rented, and the trainer
decides `gradient_checkpointing: auto` from the same numbers on the machine it landed on.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
BYTES_PER_WEIGHT = {"full": 2.0, "lora": 2.0, "qlora": 0.5 + 0.06, "8bit": 1.0 + 0.03}  # nf4 + quant constants


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * (self.hidden + 2 * self.kv_heads * head_dim) + self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + 2 * self.vocab * self.hidden

    @classmethod
    def from_config(cls, config) -> ModelShape:
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   vocab=config.vocab_size)


def activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool) -> float:
    """Activations kept for backward for `tokens` tokens in one micro-batch (bf16, fused attention).

    Without checkpointing each layer keeps its attention and SwiGLU inputs/outputs; with it only
    the layer inputs stay, plus one layer's worth while it is recomputed. The logits (fp32 for the
    loss) come on top either way.
    """
    per_layer_full = 2.0 * (11 * shape.hidden + 3.5 * shape.intermediate)
    if checkpointing:
        kept = tokens * shape.layers * 2.0 * shape.hidden + tokens * per_layer_full
    else:
        kept = tokens * shape.layers * per_layer_full
    logits = tokens * shape.vocab * 4.0 * 2
    return kept + logits


def needs_checkpointing(shape: ModelShape, tokens_per_micro_batch: int, free_bytes: float) -> bool:
    """True when the batch's activations would not fit without checkpointing (with 15 % headroom)."""
    return activation_bytes(shape, tokens_per_micro_batch, checkpointing=False) > 0.85 * free_bytes
