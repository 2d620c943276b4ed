"""What one training step costs a GPU, apart from how fast the GPU runs: FLOPs, LoRA's bytes, kernel launches.

About 2·N FLOPs per token forward, 2·N more for the backward of a frozen base (LoRA, QLoRA, 8-bit)
or 4·N for full fine-tuning, 2·N more when checkpointing recomputes the forward, plus attention.
LoRA's small kernels around each adapted layer add bytes over the GPU's memory bandwidth, and every
micro-batch costs a fixed number of tokens' worth of time on top, growing with the kernels it
launches (adapted layers add theirs). Both the calibration (which fits efficiencies to measured
runs) and the throughput model (which applies them) count with these functions.
"""
from __future__ import annotations

from dataclasses import dataclass

from .gpus import SPECS
from .memory import ALL_LINEAR, ModelShape

# peft runs LoRA's extra work per adapted layer as small memory-bound kernels (dropout over the input,
# B·A·x scaled and added to the output, the same backward). Per token they move about this many bytes
# per input and output feature of each adapted layer: 13 reproduces the share of GPU time the profiler
# put in them for all-linear QLoRA on the H100, 16 % (bench/results/profile_step.jsonl).
LORA_BYTES_PER_FEATURE = 13.0
# The fixed cost of a micro-batch grows with the kernels it launches: a decoder layer's own forward
# is about 20 kernels (norms, four projections, rotary, attention, MLP, residual adds), an adapted
# layer adds 5-6 (dropout, A, B, scale, add). Leave-one-out over the calibration rows is flat
# between 1 and 7 here (rms error 9-7 %).
LAYER_KERNELS_IN_ADAPTED_LAYERS = 3


@dataclass(frozen=True)
class StepConditions:
    """What a training step's speed depends on, for a plan or for a calibration row."""
    shape: ModelShape
    method: str
    recomputed_share: float  # fraction of layers checkpointed, whose forward pass runs twice
    attention_span: float  # keys a token attends to on average (half its row, or half its document)
    micro_batch_tokens: float = 0.0  # padded tokens per micro-batch (0: not recorded)
    lora_targets: tuple[str, ...] = ()  # adapted module names (none for full fine-tuning)

    @property
    def passes(self) -> float:
        """Forward-pass equivalents: the forward, the backward (twice that when weights get gradients),
        and the recomputed forward of checkpointed layers."""
        return (3 if self.method == "full" else 2) + self.recomputed_share

    @property
    def adapted_per_layer(self) -> list[str]:
        return [m for m in self.lora_targets if m in self.shape.module_shapes()]


def flops_per_token(step: StepConditions) -> float:
    """Matmul FLOPs a token costs; attention's backward costs twice its forward."""
    shape = step.shape
    attention = 4 * shape.layers * step.attention_span * shape.attention_width * (3 + step.recomputed_share)
    return 2.0 * shape.matmul_params * step.passes + attention


def attention_span(document_lengths) -> float:
    """Keys a token attends to on average when attention stays inside each document: a token of a
    document of L tokens sees L/2 on average, and longer documents hold more of the tokens, so the
    mean is sum(L²) / (2·sum(L))."""
    lengths = [float(length) for length in document_lengths]
    return sum(length * length for length in lengths) / (2 * sum(lengths)) if lengths else 0.0


def model_flops_per_token(shape: ModelShape, method: str, span: float, trainable_params: int = 0) -> float:
    """The FLOPs a token needs, not what the GPU runs: MFU's numerator. Recomputation is left out, a frozen
    base costs its forward and its input gradient (4·N, not 6·N), and the adapters' own weights (the
    trainable ones, each used forward, for the input gradient and for its own gradient) add 6 each."""
    frozen = StepConditions(shape, method, recomputed_share=0.0, attention_span=span)
    adapters = 0 if method == "full" else 6 * trainable_params
    return flops_per_token(frozen) + adapters


def lora_seconds_per_token(step: StepConditions, gpu: str) -> float:
    """Time peft's LoRA spends outside the matmuls: per adapted layer it runs dropout over the input and
    scales and adds B·A·x into the output as separate memory-bound kernels, and again backward."""
    features = sum(sum(step.shape.module_shapes()[m]) for m in step.adapted_per_layer) * step.shape.layers
    forward_share = (1 + step.recomputed_share) / 3  # one of three passes is the forward; recomputing repeats it
    return features * LORA_BYTES_PER_FEATURE * (2 / 3 + forward_share) / (SPECS[gpu].bandwidth_gbs * 1e9)


def launch_weight(step: StepConditions) -> float:
    """A micro-batch's fixed cost relative to all-linear LoRA's: kernels launched per layer, where a
    decoder layer's own count as LAYER_KERNELS_IN_ADAPTED_LAYERS adapted layers."""
    own = LAYER_KERNELS_IN_ADAPTED_LAYERS
    return (own + len(step.adapted_per_layer)) / (own + len(ALL_LINEAR))
