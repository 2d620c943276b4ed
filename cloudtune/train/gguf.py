"""The merged model as a GGUF file, for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

The Llama layout only (Llama-2/3-style and Mistral checkpoints without rope scaling): other
architectures are refused by name. Tensor names come from the gguf package's own map of Hugging Face
names. Hugging Face's rotary embedding pairs dimension i of a head with dimension i + d/2; ggml's
pairs 2i with 2i+1, so the rows of the q and k projections are reordered, which leaves every
attention score unchanged. 1-D tensors (norms) stay in f32, as llama.cpp keeps them; q8_0 quantises
every 2-D tensor whose rows split into its 32-value blocks, and writes the others in f16.

Every file written is read back with gguf's reader and compared with the weights it came from.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import CloudtuneError
from ..gguf_kinds import GGUF_ADAPTER
from . import say

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_DIR = "gguf"
# The pre-tokenizer regex of Llama-3's tokenizer.json: llama.cpp calls it llama-bpe; others get its default.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"


def check_supported(config) -> None:
    """Refuse, before any training, a model this exporter cannot write faithfully."""
    architectures = list(getattr(config, "architectures", None) or [type(config).__name__])
    hint = ("Save the merged model (outputs.merge: true) and convert it with llama.cpp's convert_hf_to_gguf.py, "
            "or drop outputs.gguf.")
    if not set(architectures) & set(SUPPORTED):
        raise CloudtuneError(f"outputs.gguf: GGUF export supports the Llama layout ({', '.join(SUPPORTED)}); this "
                             f"model is {', '.join(architectures)}.", hint)
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CloudtuneError(f"outputs.gguf: the model scales its rotary embedding ({rope}), which this exporter "
                             "does not write yet.", hint)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CloudtuneError("outputs.gguf: the model has attention or MLP biases, which the Llama layout "
                             "written here has not.", hint)


def _rope_parameters(config) -> dict:
    # transformers 5 keeps rope_theta and any scaling in rope_parameters; 4.x in rope_theta and rope_scaling
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _interleaved_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 values in GGUF's layout) for every tensor of a merged Llama-layout model."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the embedding as the head when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CloudtuneError(f"outputs.gguf: the model's tensor {hf_name} has no place in the Llama layout.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _interleaved_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _interleaved_rotary(data, config.num_key_value_heads)
        yield name, data


def _encoded(data: np.ndarray, kind: str):
    import gguf

    if data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    if kind == "q8_0" and data.shape[-1] % block == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model, tokenizer, dest: Path, kind: str, name: str) -> Path:
    check_supported(model.config)
    writer, partial = _open(dest)
    _write_metadata(writer, model.config, kind, name)
    _write_vocabulary(writer, tokenizer)
    for tensor_name, data in gguf_tensors(model):
        encoded, qtype = _encoded(data, kind)
        writer.add_tensor(tensor_name, encoded, raw_dtype=qtype)
    return _finish(writer, partial, dest)


def _open(dest: Path):
    """A writer for `dest` that writes beside it under a hidden name until _finish moves the whole file there."""
    import gguf

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    return gguf.GGUFWriter(str(partial), "llama"), partial


def _finish(writer, partial: Path, dest: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(dest)  # a file under the final name is a whole one
    return dest


def _write_metadata(writer, config, kind: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = _rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocabulary(writer, tokenizer) -> None:
    """The tokenizer's whole vocabulary, its merges and special tokens, and its chat template."""

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise CloudtuneError(f"outputs.gguf: a {model['type']} tokenizer; the exporter writes BPE tokenizers "
                             "(Llama-2/3, Mistral) only.")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = _token_types(tokenizer, tokens, bool(model.get("byte_fallback")))
    # SentencePiece-style BPE (byte fallback) is llama.cpp's "llama" tokenizer; byte-level BPE its "gpt2"
    writer.add_tokenizer_model("llama" if model.get("byte_fallback") else "gpt2")
    writer.add_tokenizer_pre("llama-bpe" if LLAMA3_SPLIT in json.dumps(spec.get("pre_tokenizer")) else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model.get("byte_fallback"):  # the "llama" tokenizer merges by score: earlier vocabulary entries first
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges and not model.get("byte_fallback"):
        merges = [_inert_merge(tokens)]
    if merges:
        writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _inert_merge(tokens: list[str]) -> str:
    """llama.cpp refuses a byte-level BPE vocabulary without merges, and a tokenizer of single bytes (the tiny
    model's) has none, while gguf cannot write an empty list. One merge whose result is no token changes no
    tokenization: llama.cpp splits a merged piece it has no token for back into its bytes."""
    vocabulary = set(tokens)
    singles = [token for token in tokens if len(token) == 1 and token.isascii() and token.isalnum()]
    return next(f"{a} {b}" for a in singles for b in singles if a + b not in vocabulary)


def _token_types(tokenizer, tokens: list[str], byte_fallback: bool) -> list[int]:
    """CONTROL for special tokens (in the vocabulary or added), USER_DEFINED for other added ones, BYTE
    for SentencePiece's <0xNN> fallbacks."""
    import gguf

    special = set(tokenizer.all_special_ids)
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    types = []
    for token_id, text in enumerate(tokens):
        if token_id in special or added.get(text):
            types.append(gguf.TokenType.CONTROL)
        elif text in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def verify_gguf(path: Path, model, tokenizer) -> dict:
    """Read a written file back with gguf's reader: every tensor against the weights it came from
    (exact for f16 and f32, within q8_0's rounding), the model's shape and the whole vocabulary."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    expected = dict(gguf_tensors(model))
    found = {tensor.name: tensor for tensor in reader.tensors}
    if set(found) != set(expected):
        raise CloudtuneError(f"{path}: holds tensors {sorted(set(found) ^ set(expected))[:5]} it should not, or "
                             "lacks them.")
    worst, quantized = 0.0, 0
    for name, want in expected.items():
        tensor = found[name]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        worst = max(worst, _tensor_error(path, name, tensor.tensor_type, got, want))
        quantized += tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    _check_fields(path, reader, model.config, tokenizer)
    return {"tensors": len(expected), "quantized_tensors": quantized, "max_abs_error": worst}


def _tensor_error(path: Path, name: str, qtype, got: np.ndarray, want: np.ndarray) -> float:
    import gguf

    error = np.abs(got - want)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        # q8_0: blocks of 32 values as int8 times one f16 scale, absmax / 127: each value is off by at most
        # half a step, plus what rounding the scale to f16 moves the largest step (2^-11 of absmax)
        absmax = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True)
        bound = (absmax * (0.5 / 127 + 2.0 ** -11) * (1 + 1e-6)).repeat(32, axis=1).reshape(want.shape)
    else:
        stored = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
        bound, want = 0.0, want.astype(stored).astype(np.float32)
        error = np.abs(got - want)
    if np.any(error > bound):
        raise CloudtuneError(f"{path}: tensor {name} does not hold the merged weights ({qtype.name}, off by up to "
                             f"{float(error.max()):.3g}).")
    return float(error.max()) if error.size else 0.0


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _check_fields(path: Path, reader, config, tokenizer) -> None:
    wanted = {"general.architecture": "llama", "llama.block_count": config.num_hidden_layers,
              "llama.embedding_length": config.hidden_size, "llama.attention.head_count": config.num_attention_heads,
              "llama.attention.head_count_kv": config.num_key_value_heads,
              "tokenizer.ggml.tokens": tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))),
              "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
              "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id}
    for key, value in wanted.items():
        if value is not None and _field(reader, key) != value:
            raise CloudtuneError(f"{path}: metadata {key} is not what the model has.")


def export_gguf(model, tokenizer, out: Path, kinds: list[str], name: str) -> list[dict]:
    """Write and verify one GGUF file of the merged model per kind under out/gguf/; what run.json says of each."""
    _need_gguf()
    written = []
    for kind in kinds:
        path = write_gguf(model, tokenizer, out / GGUF_DIR / f"{name}-{kind}.gguf", kind, name)
        checked = verify_gguf(path, model, tokenizer)
        say(f"gguf: {path.relative_to(out)} written and read back: {checked['tensors']} tensors match the merged "
            f"weights (largest difference {checked['max_abs_error']:.2g})")
        written.append({"kind": kind, "file": str(path.relative_to(out)), "bytes": path.stat().st_size, **checked})
    return written


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401 - its writer and reader are used by each exporter
    except ImportError:
        raise CloudtuneError("outputs.gguf needs the gguf package.", "pip install 'cloudtune[train]' (or gguf)") \
            from None


def export_all(out: Path, kinds: list[str], name: str, merged: Callable[[], tuple], adapter_dir: Path | None,
               config) -> list[dict]:
    """Every GGUF file `kinds` asks for, in its order: `merged()` gives (model, tokenizer) and is called only when
    a merged kind is asked for; `adapter_dir` is the run's LoRA adapter (None: a full fine-tune)."""
    merged_kinds = [kind for kind in kinds if kind != GGUF_ADAPTER]
    by_kind = {}
    if merged_kinds:
        model, tokenizer = merged()
        by_kind = {entry["kind"]: entry for entry in export_gguf(model, tokenizer, out, merged_kinds, name)}
    if GGUF_ADAPTER in kinds:
        if adapter_dir is None:
            raise CloudtuneError("outputs.gguf: 'lora' writes the LoRA adapter alone, and this run trained every "
                                 "weight: there is no adapter.", "Export the whole model: --gguf f16 or q8_0.")
        by_kind[GGUF_ADAPTER] = export_adapter(adapter_dir, config, out, name)
    return [by_kind[kind] for kind in kinds]


# ----------------------------------------------------------------------------------------------
# The LoRA adapter alone, as llama.cpp's convert_lora_to_gguf.py writes one: general.type "adapter",
# adapter.type "lora", adapter.lora.alpha, and per adapted weight `<its GGUF name>.lora_a` (A, r x in) and
# `.lora_b` (B, out x r). llama.cpp adds (B·A)·alpha/r to the weight, so B of the q and k projections gets
# the same row reordering as those weights get in the merged file.

LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
ADAPTER_REFUSED_HINT = "Export the merged model instead: --gguf f16 or q8_0."


def adapter_alpha(adapter_dir: Path) -> float:
    """adapter.lora.alpha for llama.cpp, which scales by alpha / r, from peft's adapter_config.json."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise CloudtuneError(f"{adapter_dir}: a DoRA adapter; llama.cpp's LoRA adapter file has no place for its "
                             "magnitude vectors.", ADAPTER_REFUSED_HINT)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CloudtuneError(f"{adapter_dir}: the adapter's rank or alpha differs between layers, and a GGUF "
                             "adapter has one alpha.", ADAPTER_REFUSED_HINT)
    alpha = float(config["lora_alpha"])
    # rank-stabilised LoRA scales by alpha / sqrt(r): the same as alpha·sqrt(r) / r
    return alpha * math.sqrt(config["r"]) if config.get("use_rslora") else alpha


def adapter_tensors(adapter_dir: Path, config) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 values in GGUF's layout) for every A and B matrix of a peft LoRA adapter."""
    import gguf
    from safetensors.torch import load_file

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        found = LORA_KEY.fullmatch(key)
        if found is None:
            raise CloudtuneError(f"{adapter_dir}: the adapter holds {key}, which is no LoRA A or B matrix (DoRA "
                                 "magnitudes, embedding adapters and modules_to_save have no place in a GGUF "
                                 "adapter).", ADAPTER_REFUSED_HINT)
        module, part = found["module"], found["part"]
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None or (module == "lm_head" and config.tie_word_embeddings):
            raise CloudtuneError(f"{adapter_dir}: the adapted module {module} has no weight of its own in the Llama "
                                 "layout's GGUF file.", ADAPTER_REFUSED_HINT)
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if part == "B" and module.endswith("self_attn.q_proj"):
            data = _interleaved_rotary(data, config.num_attention_heads)
        elif part == "B" and module.endswith("self_attn.k_proj"):
            data = _interleaved_rotary(data, config.num_key_value_heads)
        yield f"{name}.lora_{part.lower()}", data


def write_adapter(adapter_dir: Path, config, dest: Path, name: str) -> Path:
    import gguf

    check_supported(config)
    alpha = adapter_alpha(adapter_dir)
    tensors = dict(adapter_tensors(adapter_dir, config))
    writer, partial = _open(dest)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)  # A and B are small: kept as trained
    for tensor_name, data in tensors.items():
        writer.add_tensor(tensor_name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    return _finish(writer, partial, dest)


def verify_adapter(path: Path, adapter_dir: Path, config) -> dict:
    """Read the adapter file back: its type and alpha, and every A and B exactly as the adapter has them."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    wanted = {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
    for key, value in wanted.items():
        if _field(reader, key) != value:
            raise CloudtuneError(f"{path}: metadata {key} is not {value!r}.")
    if not math.isclose(_field(reader, "adapter.lora.alpha"), adapter_alpha(adapter_dir), rel_tol=1e-6):
        raise CloudtuneError(f"{path}: adapter.lora.alpha is not the adapter's.")
    expected = dict(adapter_tensors(adapter_dir, config))
    found = {tensor.name: tensor for tensor in reader.tensors}
    if set(found) != set(expected):
        raise CloudtuneError(f"{path}: holds tensors {sorted(set(found) ^ set(expected))[:5]} it should not, or "
                             "lacks them.")
    for name, want in expected.items():
        got = np.asarray(found[name].data).reshape(want.shape)
        if not np.array_equal(got, want):
            raise CloudtuneError(f"{path}: tensor {name} is not the adapter's.")
    return {"tensors": len(expected), "quantized_tensors": 0, "max_abs_error": 0.0}


def export_adapter(adapter_dir: Path, config, out: Path, name: str) -> dict:
    _need_gguf()
    path = write_adapter(adapter_dir, config, out / GGUF_DIR / f"{name}-{GGUF_ADAPTER}.gguf", name)
    checked = verify_adapter(path, adapter_dir, config)
    say(f"gguf: {path.relative_to(out)} written and read back: {checked['tensors']} LoRA tensors, exactly the "
        "adapter's (llama.cpp: --lora on the base model's GGUF)")
    return {"kind": GGUF_ADAPTER, "file": str(path.relative_to(out)), "bytes": path.stat().st_size, **checked}


def export_run(output_dir: Path, kinds: list[str]) -> list[dict]:
    """`cloudtune export RUN --gguf KIND`: GGUF files from a finished run's outputs, after the fact."""
    from transformers import AutoConfig

    from .inference import load_trained, saved_recipe
    from .model import spec_source

    run = json.loads((output_dir / "run.json").read_text())
    adapter_dir = output_dir / run["weights_dir"] if run["weights_dir"] == "adapter" else None
    if adapter_dir is not None:
        spec = saved_recipe(output_dir).model
        config = AutoConfig.from_pretrained(spec_source(spec), revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(output_dir / run["weights_dir"])

    def merged() -> tuple:
        trained = load_trained(output_dir)
        return trained.model, trained.tokenizer

    return export_all(output_dir, kinds, run["name"], merged, adapter_dir, config)
