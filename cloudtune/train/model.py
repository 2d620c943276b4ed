"""Load the base model and tokenizer, quantise when the method asks, wrap with LoRA.

A tiny random Llama is first written to disk and then loaded like any checkpoint, so the demo and
the tests go through the same `from_pretrained` path as a hub model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CloudtuneError
from ..formats import FALLBACK_CHAT_TEMPLATE
from ..paths import home
from ..recipe import ModelSpec, Recipe
from ..tiny import SPECIAL_TOKENS, TINY_LLAMA, VOCAB_SIZE
from . import attention
from .hub_errors import loading_model


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte-level alphabet: every byte maps to a printable character, so no byte is lost.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


TINY_WEIGHTS = "model.safetensors"


def tiny_llama_dir() -> Path:
    """Write the tiny model once (seeded, so identical everywhere) and return its directory."""
    target = home() / "models" / "tiny-llama-v1"
    if (target / "config.json").exists() and (target / TINY_WEIGHTS).exists():
        return target
    from safetensors.torch import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    # Seeded for identical weights everywhere, in a forked RNG so the caller's seeded stream
    # (dropout, data order) is the same whether or not this run had to write the model first.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    scratch = Path(tempfile.mkdtemp(dir=target.parent))
    # Not model.save_pretrained: under torchrun it writes only on global rank 0, and every machine of a
    # multi-node run needs its own copy (a rank that wrote nothing once left a folder without weights).
    config.architectures, config.dtype = [type(model).__name__], "float32"  # what save_pretrained records
    config.save_pretrained(scratch)
    save_model(model, str(scratch / TINY_WEIGHTS), metadata={"format": "pt"})
    build_byte_tokenizer().save_pretrained(scratch)
    if target.exists() and not (target / TINY_WEIGHTS).exists():  # such a folder, left by an older version
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(scratch, target)  # atomic: a concurrent run sees all of it or none
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)  # another process won the race; theirs is identical
    return target


def model_source(recipe: Recipe) -> str:
    return spec_source(recipe.model)


def spec_source(spec: ModelSpec) -> str:
    return str(tiny_llama_dir()) if spec.init == "tiny-llama" else spec.name


def load_merged(spec: ModelSpec, adapter_dir: Path):
    """A fresh, unquantised copy of the base in its own dtype, with the adapter merged in, on the host.

    Not on the GPU: a 7B base in bf16 needs 14 GB that the GPU may not have beside the trained model.
    For qlora/8bit this merges into the full-precision base, which is what the adapter is loaded onto
    at inference too; it is not bit-identical to the quantised training model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec_source(spec), dtype="auto", revision=spec.revision,
                                                trust_remote_code=spec.trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the frozen base (or, for full fine-tuning, every weight) is stored in
    autocast: torch.dtype | None  # what matmuls run in; None: each in its weights' dtype

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without it; the fp32 LoRA weights take the unscaled update."""
        return self.autocast == torch.float16

    @property
    def name(self) -> str:
        return str(self.autocast or "off").removeprefix("torch.")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(recipe: Recipe, device: torch.device) -> Precision:
    """bf16 on GPUs that have it, else fp16 with loss scaling; `training.precision` can insist on either.

    peft keeps LoRA weights in fp32 for the optimizer's sake; every forward runs under autocast so
    that LoRA's matmuls read the layer's 16-bit input on the tensor cores instead of keeping an fp32
    copy of it for backward (on an H100, 7B QLoRA: 9,947 → 14,425 tok/s and 62 → 37 GiB,
    bench/results/train_speed.jsonl). On a CPU the weights stay fp32 (bf16 matmuls there are slow
    and lossy); naming a precision still autocasts to it, which is how the tests run the GPU paths.
    """
    if device.type != "cuda":
        return Precision(torch.float32, DTYPES.get(recipe.training.precision))
    from .fp8 import fp8_matmuls

    dtype = DTYPES[recipe.gpu_precision(torch.cuda.get_device_name(device), torch.cuda.is_bf16_supported(),
                                        fp8_matmuls(device))]
    return Precision(dtype, dtype)


def mixed_precision(precision: Precision, device: torch.device):
    """The context every forward pass of the trained model runs in (training steps and samples alike)."""
    from contextlib import nullcontext

    return torch.autocast(device.type, dtype=precision.autocast) if precision.autocast else nullcontext()


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    with loading_model(recipe.model, model_source(recipe)):
        tokenizer = AutoTokenizer.from_pretrained(model_source(recipe), revision=recipe.model.revision,
                                                  trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return with_recipe_chat_template(tokenizer, recipe.dataset)


def with_recipe_chat_template(tokenizer, dataset):
    """dataset.chat_template in place of the model's own; it is saved with the tokenizer, so the adapter,
    the merged model, GGUF files and `cloudtune try` all render chats as the training did."""
    if dataset.chat_template is not None:
        from ..chat_templates import resolve

        tokenizer.chat_template = resolve(dataset.chat_template)
    return tokenizer


def load_config(recipe: Recipe):
    from transformers import AutoConfig

    with loading_model(recipe.model, model_source(recipe)):
        return AutoConfig.from_pretrained(model_source(recipe), revision=recipe.model.revision,
                                          trust_remote_code=recipe.model.trust_remote_code)


def load_base(recipe: Recipe, device: torch.device, sharded: bool = False):
    """The base model on `device`; `sharded` (FSDP) loads it into host memory instead, for fully_shard to
    move each rank's shard to its GPU, since the whole model may not fit one GPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = choose_precision(recipe, device).weights
    kwargs: dict = dict(dtype=dtype, revision=recipe.model.revision,
                        attn_implementation=attention.implementation(recipe.training.attention, device),
                        trust_remote_code=recipe.model.trust_remote_code)
    if recipe.method == "qlora":
        # The QLoRA recipe: nf4 with double quantisation, matmuls in 16 bits. FSDP shards parameters of one
        # float dtype, so for FSDP the packed 4-bit weights are stored in the compute dtype (peft's and
        # bitsandbytes' FSDP-QLoRA setting); otherwise they keep the default uint8 storage.
        storage = {"bnb_4bit_quant_storage": dtype} if sharded else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, **storage)
    elif recipe.method == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes quantises while loading onto the GPU, so a 4-bit base is loaded there even for FSDP.
    # fp8 loads the 16-bit base into host memory and quantises it one linear layer at a time on the GPU
    # (train/fp8.py), so the GPU never holds more than the fp8 model and one 16-bit layer.
    if device.type == "cuda" and (not sharded or recipe.method == "qlora") and recipe.method != "fp8":
        kwargs["device_map"] = {"": device.index or 0}
    with loading_model(recipe.model, model_source(recipe)):
        model = AutoModelForCausalLM.from_pretrained(model_source(recipe), **kwargs)
    model.config.use_cache = False
    if recipe.method == "fp8":
        from .fp8 import quantise_decoder_linears

        quantise_decoder_linears(model, choose_precision(recipe, device).autocast or dtype, device)
        return model.to(device)
    return model.to(device) if device.type != "cuda" and not sharded else model


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    spec = recipe.lora
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=spec.target_modules,
                      use_dora=spec.use_dora, use_rslora=spec.use_rslora)


def apply_fused_kernels(recipe: Recipe, model, device: torch.device) -> bool:
    """Swap in Liger's Triton kernels; the fused head + loss never materialises the logits. With them,
    prepare_for_training fuses each LoRA projection (fused_lora.py).

    On by default on a GPU when liger-kernel is installed; the tokens/s it buys are in bench/results.
    """
    choice = recipe.training.fused_kernels
    if choice == "off" or device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        if choice == "on":
            raise CloudtuneError("training.fused_kernels: on needs the liger-kernel package.",
                                 "pip install liger-kernel, or set fused_kernels: auto.") from None
        return False
    _apply_liger_kernel_to_instance(model=model)
    return True


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model, count: int) -> None:
    """Recompute the first `count` decoder layers in backward; their activations live longest.

    Non-reentrant checkpointing handles frozen inputs itself, so no input-grad hooks are needed.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = index < count
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def prepare_for_training(recipe: Recipe, model, checkpointed_layers: int, autocast: bool, fused_lora: bool = False):
    """LoRA (or full) on the loaded base, with the first `checkpointed_layers` decoder layers recomputed in backward.

    With `autocast` (forward passes under `mixed_precision`), each LoRA module reads the layer's 16-bit
    input as it is: peft's cast to the fp32 adapter dtype would keep a second, fp32 copy of every
    module's input for backward, only for autocast to cast it back to 16 bits. `fused_lora`: each adapted
    projection, or group of them reading one input, runs as one autograd function (train/fused_lora.py),
    part of the fused kernels.
    """
    # Quantised bases stay in 16 bits around the 4/8-bit weights, and get_peft_model freezes the base.
    # peft's prepare_model_for_kbit_training would upcast norms, embeddings and the 32k-wide head to
    # fp32: the head matmul then runs without tensor cores and the residual stream doubles in size.
    set_checkpointed_layers(model, checkpointed_layers)
    if recipe.uses_lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe))
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = not autocast
        if fused_lora:
            from .fused_lora import fuse_lora

            fuse_lora(model)
    return model
