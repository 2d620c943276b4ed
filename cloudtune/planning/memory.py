"""GPU memory model for a fine-tune: weights, adapter and optimizer state, activations, logits.

Used on both sides: the planner marks which GPUs fit before anything is rented, and the trainer
decides `gradient_checkpointing: auto` from the same numbers on the machine it landed on.

The model predicts what PyTorch's caching allocator reports as `max_memory_allocated`. It is built
from what autograd actually keeps for a Llama decoder layer, term by term, and each term depends on
how the training code is written (a "stack"): cloudtune's own trainer, the trl SFTTrainer the seed
recipes use (with or without liger kernels), or Unsloth. Stacks differ in the dtype activations
flow in (peft's k-bit preparation upcasts norms and embeddings to fp32, which keeps the hidden
states fp32), whether LoRA inputs are copied per module (peft casts them to the fp32 adapter dtype),
and whether norms, SwiGLU and the loss are fused kernels. tests/test_memory_model.py holds
the model to every peak measured on an H100 (../shared/data/h100-anchor-measurements.jsonl) within
±20 %, and to what autograd saves in cloudtune's own model preparation on CPU.

To fit a real GPU the CUDA context and allocator fragmentation come on top (`required_bytes`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

GIB = 2**30
ATTENTION_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
ALL_LINEAR = ATTENTION_IN + ("o_proj",) + MLP_IN + ("down_proj",)
KBIT = ("qlora", "8bit")

# What a GPU loses before the first tensor: the CUDA context with cuBLAS/cuDNN handles (about
# 0.5–0.8 GiB on an H100 with torch 2.x), plus blocks the caching allocator holds but cannot reuse.
CUDA_CONTEXT_BYTES = 0.8 * GIB
FRAGMENTATION = 0.08
# Small allocations that are not per token: cuBLAS workspaces, the optimizer's scratch, masks.
WORKSPACE_BYTES = 0.15 * GIB
# bitsandbytes' int8 matmul keeps its input (and outlier columns) per module for backward, in a plain
# ctx attribute that gradient checkpointing cannot see, so every layer keeps it either way. What that
# costs per input element and byte of activation dtype is calibrated on cloudtune's two 8-bit H100
# runs (bench/results/gpu_methods.jsonl: 69.2 GiB with fp32 activations and no checkpointing, 17.9 GiB
# with bf16 activations and checkpointing, both at 2 x 2048 tokens), not derived.
INT8_SAVED_BYTES_PER_ACT_BYTE = 1.125
FSDP_GATHERED_LAYERS = 2  # the layer running and the next one, prefetched


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # Gemma and a few others decouple it from hidden / heads
    tied_embeddings: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_size

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.attention_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width),
                "o_proj": (self.attention_width, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights in the decoder layers' linear layers: what quantisation shrinks."""
        return self.layers * sum(a * b for a, b in self.module_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + self.embedding_params + norms

    @property
    def matmul_params(self) -> int:
        """Weights every token is multiplied by (decoder linears and the LM head): the FLOP count's N."""
        return self.linear_params + self.vocab * self.hidden

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config object or a config.json dict."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        text = get("text_config")
        if text:  # multimodal checkpoints keep the language model's shape one level down
            return cls.from_config(text)
        heads = get("num_attention_heads")
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads, vocab=get("vocab_size"),
                   head_dim=get("head_dim"), tied_embeddings=bool(get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class Stack:
    """How one training implementation spends memory (see the module docstring)."""

    name: str
    act_bytes: int = 2  # hidden states inside and between layers: 2 (bf16), 4 when norms run in fp32
    norm_bytes: int = 4  # per hidden unit kept by each RMSNorm: HF keeps an fp32 copy; fused keeps its input
    mlp_saved: int = 3  # intermediate-sized tensors SwiGLU keeps: gate, silu, up (fused: gate, up)
    lora_copy_bytes: int = 4  # each LoRA module's own copy of its input (0: shares the layer's input)
    adapter_bytes: int = 4  # adapter weights, grads and outputs: fp32 (peft's default)
    mask_bytes: int = 1  # one dropout mask element: bool on CUDA
    upcast_embeddings: bool = False  # peft's k-bit preparation: embeddings, LM head and norms in fp32
    fused_loss: bool = False  # logits never materialised (fused linear cross-entropy)
    offload_checkpoints: bool = False  # checkpointed layer inputs live in CPU memory
    paged_optimizer: bool = False  # optimizer states in CUDA unified memory, outside the allocator
    optimizer_state_bytes: float = 8.0  # per trainable parameter (AdamW: two fp32 moments)


def cloudtune_stack(method: str, fused_kernels: bool = False, autocast: bool = True) -> Stack:
    """cloudtune's trainer (train/model.py + train/loop.py): a bf16 model (quantised bases too: nothing is
    upcast to fp32) and peft's adapters in fp32. On GPUs with bf16 the forward runs under bf16
    autocast and LoRA reads each layer's own input; without (`autocast=False`: fp16-only GPUs, and
    every H100 row measured before autocast came in) each LoRA module keeps an fp32 copy of its
    input. With Liger's fused kernels (training.fused_kernels, on a GPU with liger-kernel installed)
    each norm keeps only its input, SwiGLU recomputes the silu, and head + loss never build the logits.
    """
    del method  # every method shares the layout since quantised bases stay in bf16
    copy = 0 if autocast else 4
    if fused_kernels:
        return Stack("cloudtune+liger", norm_bytes=2, mlp_saved=2, fused_loss=True, lora_copy_bytes=copy)
    return Stack("cloudtune", lora_copy_bytes=copy)


def cloudtune_kbit_fp32_stack() -> Stack:
    """cloudtune's trainer for qlora/8bit until 2026-11-23 (main before c753919): peft's
    prepare_model_for_kbit_training cast every unquantised weight to fp32, so the embeddings emitted
    fp32 and the hidden states stayed fp32 through the network, and LoRA read that fp32 input without
    copying it. Kept because the H100 rows in bench/results measured before that date ran it."""
    return Stack("cloudtune-kbit-fp32", act_bytes=4, norm_bytes=4, lora_copy_bytes=0, upcast_embeddings=True)


@functools.cache  # reading the package metadata costs milliseconds, and every offer's estimate asks
def fused_kernels_by_default() -> bool:
    """Whether `fused_kernels: auto` means Liger on a rented GPU: only if the [train] extra installs it."""
    from importlib import metadata

    try:
        requires = metadata.requires("cloudtune") or []
    except metadata.PackageNotFoundError:
        return False
    return any(r.lower().startswith("liger") and "train" in r for r in requires)


def trl_stack(method: str, *, liger: bool = False, optimizer: str = "adamw") -> Stack:
    """trl's SFTTrainer with bf16 autocast; with `liger`, fused RMSNorm, SwiGLU and cross-entropy."""
    base = Stack("trl+liger" if liger else "trl", act_bytes=2, norm_bytes=2 if liger else 4,
                 mlp_saved=2 if liger else 3, fused_loss=liger,
                 # under autocast peft's bitsandbytes layer feeds LoRA the bf16 input as is; its plain
                 # Linear casts to fp32 first and autocast casts back, keeping a bf16 copy per module
                 lora_copy_bytes=0 if method in KBIT else 2)
    return _with_optimizer(base, optimizer)


def unsloth_stack(optimizer: str = "adamw_8bit") -> Stack:
    """Unsloth: fused LoRA MLP/attention kernels, chunked cross-entropy, checkpoints offloaded to CPU."""
    return _with_optimizer(Stack("unsloth", norm_bytes=2, mlp_saved=2, lora_copy_bytes=0, fused_loss=True,
                                 offload_checkpoints=True), optimizer)


def _with_optimizer(stack: Stack, optimizer: str) -> Stack:
    if optimizer.startswith("paged"):
        return replace(stack, paged_optimizer=True)
    if "8bit" in optimizer:
        return replace(stack, optimizer_state_bytes=2.0)
    return stack


@dataclass(frozen=True)
class TrainSetup:
    """What besides the model's shape decides memory: method, LoRA, optimizer, implementation."""

    method: str = "lora"  # lora | qlora | 8bit | fp8 | full
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dropout: float = 0.05
    double_quant: bool = True  # cloudtune's QLoRA quantises the quantisation constants too
    stack: Stack | None = None  # default: cloudtune's trainer for this method
    # FSDP: weights, gradients and optimizer state split over this many GPUs; 1 when each GPU holds
    # them all (one GPU, or DDP, whose replicas are the one-GPU model)
    shards: int = 1

    @property
    def impl(self) -> Stack:
        return self.stack or cloudtune_stack(self.method)

    @classmethod
    def from_recipe(cls, recipe, fused_kernels: bool | None = None, autocast: bool = True) -> TrainSetup:
        """The recipe on cloudtune's trainer; `fused_kernels` is known on the training machine, and
        otherwise follows the recipe (auto: whatever the training image installs). `autocast`: forward
        passes run under 16-bit autocast, as on every GPU (see train/model.choose_precision)."""
        lora = recipe.lora
        targets = ALL_LINEAR if lora.target_modules == "all-linear" else tuple(lora.target_modules)
        if fused_kernels is None:
            choice = getattr(recipe.training, "fused_kernels", "auto")
            fused_kernels = choice == "on" or (choice == "auto" and fused_kernels_by_default())
        stack = _with_optimizer(cloudtune_stack(recipe.method, fused_kernels, autocast), recipe.training.optimizer)
        return cls(method=recipe.method, lora_r=lora.r, lora_targets=targets, lora_dropout=lora.dropout, stack=stack)


@dataclass(frozen=True)  # memory_peak's answers are cached and shared
class MemoryPeak:
    """Bytes at the peak of one training step, by what holds them."""

    weights: float
    trainable: float  # adapter (or, for full, extra) weights + gradients + optimizer states
    activations: float  # what autograd keeps for backward (or checkpointed inputs + one layer)
    logits: float  # the transient peak on top: the loss, or with checkpointing a recomputed layer
    workspace: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + self.logits + self.workspace

    @property
    def gib(self) -> float:
        return self.total / GIB

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GIB, 3) for k in ("weights", "trainable", "activations", "logits",
                                                             "workspace")} | {"total": round(self.gib, 3)}


def lora_params(shape: ModelShape, setup: TrainSetup) -> int:
    modules = shape.module_shapes()
    return shape.layers * sum(setup.lora_r * (modules[m][0] + modules[m][1])
                              for m in setup.lora_targets if m in modules)


def weight_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    other = shape.params - shape.linear_params  # embeddings, LM head, norms: never quantised
    if setup.method == "qlora":
        # nf4: 4 bits per weight + one absmax per block of 64 (fp32, or 8-bit with a second level)
        constants = (1 + 4 / 256) / 64 if setup.double_quant else 4 / 64
        linear = shape.linear_params * (0.5 + constants)
    elif setup.method == "8bit":
        linear = shape.linear_params * 1.0
    elif setup.method == "fp8":  # e4m3 weights and one fp32 scale per output row
        linear = shape.linear_params * 1.0 + 4.0 * shape.layers * sum(out for _, out in shape.module_shapes().values())
    else:
        linear = shape.linear_params * 2.0
    return (linear + other * (4.0 if setup.impl.upcast_embeddings and setup.method in KBIT else 2.0)) / setup.shards


def trainable_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    stack = setup.impl
    states = 0.0 if stack.paged_optimizer else stack.optimizer_state_bytes
    if setup.method == "full":
        # bf16 weights (already counted) and gradients; AdamW's two moments in the parameters' dtype
        # (bf16), or one byte each for the 8-bit optimizers
        moments = 0.0 if stack.paged_optimizer else (2.0 if stack.optimizer_state_bytes <= 2 else 4.0)
        return shape.params * (2.0 + moments)
    return lora_params(shape, setup) * (2 * stack.adapter_bytes + states)


def layer_activation_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Bytes autograd keeps per token for one decoder layer, without checkpointing."""
    stack = setup.impl
    a = stack.act_bytes
    h, i = shape.hidden, shape.intermediate
    full = setup.method == "full"
    norm = stack.norm_bytes * h + 4  # + the per-token rsqrt
    if full:  # the normalised output for the norm weight's gradient, and the linear layers' input
        norm += 2 * a * h
    attention = a * (2 * shape.attention_width + 2 * shape.kv_width) + 4 * shape.heads  # q, k, v, out, lse
    mlp = stack.mlp_saved * a * i + (a * i if full else 0)  # full: down_proj's input too
    return 2 * norm + attention + mlp + int8_kept_bytes(shape, setup) + _lora_activation_bytes(shape, setup)


def int8_kept_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Per token and layer: what bitsandbytes' 8-bit matmuls keep, checkpointing or not."""
    if setup.method != "8bit":
        return 0.0
    fan_in = sum(fan_in for fan_in, _ in shape.module_shapes().values())
    return INT8_SAVED_BYTES_PER_ACT_BYTE * setup.impl.act_bytes * fan_in


def _lora_activation_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    if setup.method == "full":
        return 0.0
    stack = setup.impl
    modules = shape.module_shapes()
    targeted = [m for m in setup.lora_targets if m in modules]
    total = sum(setup.lora_r * stack.adapter_bytes for _ in targeted)  # lora_A's output, kept by lora_B
    if setup.lora_dropout > 0:  # each module drops out its own copy and keeps the mask
        width = stack.lora_copy_bytes or stack.act_bytes
        return total + sum((width + stack.mask_bytes) * modules[m][0] for m in targeted)
    if stack.lora_copy_bytes:
        return total + sum(stack.lora_copy_bytes * modules[m][0] for m in targeted)
    # Shared inputs: the attention and MLP inputs (norm outputs) and down_proj's input are not kept
    # by the frozen base layers, so LoRA keeping them costs one copy per group; o_proj reads the
    # attention output, which attention keeps anyway.
    groups = ((ATTENTION_IN, shape.hidden), (MLP_IN, shape.hidden), (("down_proj",), shape.intermediate))
    return total + sum(stack.act_bytes * width for names, width in groups if any(m in targeted for m in names))


# A plan asks this for every offer's hardware, and most ask the same: one model, a few setups and widths.
@functools.lru_cache(maxsize=4096)
def memory_peak(shape: ModelShape, setup: TrainSetup, tokens: int, recomputed: int) -> MemoryPeak:
    """Peak allocated bytes for a micro-batch of `tokens` tokens (rows × padded width).

    `recomputed` decoder layers (0: no gradient checkpointing, shape.layers: all of them) keep only
    their input and are recomputed in backward; the others keep everything.
    """
    stack = setup.impl
    per_layer = layer_activation_bytes(shape, setup)
    if stack.fused_loss:
        loss = tokens * shape.hidden * 4.0  # chunked: only the fp32 gradient of the last hidden states
    else:
        loss = tokens * shape.vocab * 12.0  # log-softmax output, its gradient and the incoming one, fp32
    recomputed = min(recomputed, shape.layers)
    if recomputed:
        kept_input = 0.0 if stack.offload_checkpoints else stack.act_bytes * shape.hidden
        activations = tokens * recomputed * (kept_input + int8_kept_bytes(shape, setup))
        activations += tokens * (shape.layers - recomputed) * per_layer
        # During backward one layer is recomputed in full and its gradients pass through; that
        # happens after the loss's peak, so the larger of the two counts.
        transient = max(loss, tokens * (per_layer + 4 * stack.act_bytes * shape.hidden))
    else:
        activations, transient = tokens * shape.layers * per_layer, loss
    return MemoryPeak(weights=weight_bytes(shape, setup) + gathered_bytes(shape, setup),
                      trainable=trainable_bytes(shape, setup) / setup.shards,
                      activations=activations, logits=transient, workspace=WORKSPACE_BYTES)


def gathered_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """FSDP gathers each decoder layer's whole weights just before it runs and frees them after; with
    the next layer prefetched (FSDP2's default) two layers are whole at a time, on top of the shard."""
    if setup.shards <= 1:
        return 0.0
    per_layer = weight_bytes(shape, replace(setup, shards=1)) * shape.linear_params / shape.params / shape.layers
    return FSDP_GATHERED_LAYERS * per_layer * (1 - 1 / setup.shards)


def required_bytes(peak: MemoryPeak | float) -> float:
    """What a GPU must have free for a predicted peak: fragmentation and the CUDA context on top."""
    total = peak.total if isinstance(peak, MemoryPeak) else peak
    return total * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES


def choose_parallelism(requested: str, shape: ModelShape, setup: TrainSetup, world_size: int,
                       usable_bytes: float, row_tokens: int, checkpointing: str = "auto",
                       shardable: bool = True) -> str:
    """How `world_size` GPUs of `usable_bytes` each share a fine-tune: "ddp" or "fsdp".

    `training.parallelism` auto is ddp when the one-GPU run fits one of them (model, adapters and
    optimizer state, and a micro-batch of one `row_tokens`-token row with as much checkpointing as
    `checkpointing` allows): each GPU then keeps a replica and only gradients travel. Otherwise
    fsdp, which shards weights, gradients and optimizer state `world_size` ways (activations stay
    per GPU). With one GPU there is nothing to shard, nor for a fine-tune FSDP cannot shard
    (not `shardable`: Recipe.fsdp_refusal). The planner decides each offer with it, and the trainer on
    the machine it landed on, from the same numbers.
    """
    if requested != "auto":
        return requested
    if world_size <= 1 or not shardable:
        return "ddp"
    recomputed = 0 if checkpointing == "off" else shape.layers
    alone = memory_peak(shape, replace(setup, shards=1), row_tokens, recomputed)
    return "ddp" if required_bytes(alone) <= usable_bytes else "fsdp"


def sharded(setup: TrainSetup, parallelism: str, world_size: int) -> TrainSetup:
    """The setup as each GPU holds it: fsdp shards it `world_size` ways, ddp keeps the one-GPU model."""
    return replace(setup, shards=world_size if parallelism == "fsdp" else 1)


def checkpointing_note(recomputed: int, layers: int) -> str:
    return "off" if not recomputed else "on" if recomputed >= layers else f"on for {recomputed} of {layers} layers"


def layers_to_checkpoint(shape: ModelShape, tokens_per_micro_batch: int, free_bytes: float,
                         setup: TrainSetup | None = None) -> int:
    """The fewest decoder layers to recompute so that a micro-batch fits, on a GPU whose weights are loaded.

    Every layer left out of checkpointing saves a forward pass of that layer in backward, so a GPU
    with some room to spare trains faster than with all layers checkpointed. `free_bytes` is what
    the device reports after loading the base model: weights and CUDA context are already out of it.
    """
    setup = setup or TrainSetup()
    # loaded in bf16; peft's k-bit preparation upcasts the unquantised weights only afterwards
    as_loaded = weight_bytes(shape, replace(setup, stack=replace(setup.impl, upcast_embeddings=False)))
    def fits(layers: int) -> bool:
        peak = memory_peak(shape, setup, tokens_per_micro_batch, layers)
        return (peak.total - as_loaded) * (1 + FRAGMENTATION) <= 0.95 * free_bytes

    found = first_fitting(range(shape.layers + 1), fits)
    return shape.layers if found is None else found


def first_fitting(options: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The first option that fits, by bisection: memory only falls as more layers are recomputed, so
    whatever fits, every option after it fits too. A linear walk over 80-layer models times every offer
    and micro-batch made planning slow."""
    low, high = 0, len(options)
    while low < high:
        middle = (low + high) // 2
        if fits(options[middle]):
            high = middle
        else:
            low = middle + 1
    return options[low] if low < len(options) else None
