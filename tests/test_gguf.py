"""GGUF export of the tiny Llama, read back with the gguf package's own reader.

No llama.cpp runs here (building it is slow), so the q and k reordering is checked by what it must
preserve: attention scores under Hugging Face's rotary embedding with the merged weights equal those
under ggml's interleaved rotary embedding with the file's weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cloudtune.cli import cli
from cloudtune.errors import CloudtuneError
from cloudtune.train.gguf import check_supported

from .conftest import module_home
from .test_train import ALPACA, make_recipe, run

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(shared_home, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    with module_home(shared_home, tmp_path_factory):
        recipe = make_recipe(folder, ALPACA, training={"max_steps": 4},
                             outputs={"merge": True, "gguf": ["f16", "q8_0", "lora"]})
        run(recipe, folder / "out")
    return folder / "out"


def merged_weights(out: Path) -> dict[str, np.ndarray]:
    """The merged model as transformers saved it: the reference the files are compared with."""
    saved = load_file(str(out / "merged" / "model.safetensors"))
    return {name: tensor.float().numpy() for name, tensor in saved.items()}


def read(path: Path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    return reader.get_field(key).contents()


def rope_half(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """Hugging Face's rotary embedding: dimension i turns with i + d/2."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-np.arange(half) * 2 / x.shape[-1])
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                           second * np.cos(angle) + first * np.sin(angle)], axis=-1)


def rope_interleaved(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """ggml's rotary embedding for Llama: dimension 2i turns with 2i + 1."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-np.arange(half) * 2 / x.shape[-1])
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def scores(wq: np.ndarray, wk: np.ndarray, rope, heads: int, kv_heads: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(wq.shape[1]), rng.standard_normal(wq.shape[1])
    q = rope((wq @ x).reshape(heads, -1), 5, 10000.0)
    k = rope((wk @ y).reshape(kv_heads, -1), 2, 10000.0)
    return np.array([q[h] @ k[h // (heads // kv_heads)] for h in range(heads)])


def test_the_f16_file_holds_the_merged_weights_exactly_and_attends_as_the_model_does(exported):
    reader, tensors = read(exported / "gguf" / "t-f16.gguf")
    merged = merged_weights(exported)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert len(tensors) == len(merged) == 21
    for hf_name, want in merged.items():
        qtype, got = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        got = got.reshape(want.shape)
        assert qtype == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            assert sorted(got.ravel()) == sorted(want.astype(np.float16).astype(np.float32).ravel())
        else:
            assert np.array_equal(got, want.astype(np.float16 if want.ndim > 1 else np.float32).astype(np.float32))
    for layer in range(2):
        hf = scores(merged[f"model.layers.{layer}.self_attn.q_proj.weight"].astype(np.float16).astype(np.float64),
                    merged[f"model.layers.{layer}.self_attn.k_proj.weight"].astype(np.float16).astype(np.float64),
                    rope_half, 4, 2)
        ours = scores(tensors[f"blk.{layer}.attn_q.weight"][1].reshape(64, 64).astype(np.float64),
                      tensors[f"blk.{layer}.attn_k.weight"][1].reshape(32, 64).astype(np.float64),
                      rope_interleaved, 4, 2)
        assert np.allclose(hf, ours, rtol=1e-9, atol=1e-9)
        assert not np.allclose(hf, scores(tensors[f"blk.{layer}.attn_q.weight"][1].reshape(64, 64),
                                          tensors[f"blk.{layer}.attn_k.weight"][1].reshape(32, 64), rope_half, 4, 2))


def test_the_q8_0_file_is_within_its_rounding_and_quantises_what_it_can(exported):
    _, tensors = read(exported / "gguf" / "t-q8_0.gguf")
    _, exact = read(exported / "gguf" / "t-f16.gguf")
    quantized = [name for name, (qtype, _) in tensors.items() if qtype == gguf.GGMLQuantizationType.Q8_0]
    # the MLP's down projection has rows of 176 values, not a whole number of 32-value blocks: f16
    assert len(quantized) == 14 and tensors["blk.0.ffn_down.weight"][0] == gguf.GGMLQuantizationType.F16
    for name in quantized:
        got, want = tensors[name][1].ravel(), exact[name][1].ravel()
        step = np.abs(want).reshape(-1, 32).max(axis=1) / 127
        assert np.all(np.abs(got - want).reshape(-1, 32) <= step[:, None] * 0.51 + 1e-3 * step[:, None] * 127)
        assert not np.array_equal(got, want), "quantised, not copied"
    run_json = json.loads((exported / "run.json").read_text())
    assert [(g["kind"], g["tensors"], g["quantized_tensors"]) for g in run_json["gguf"]] == [
        ("f16", 21, 0), ("q8_0", 21, 14), ("lora", 28, 0)]
    files = json.loads((exported / "manifest.json").read_text())["files"]
    assert {"gguf/t-f16.gguf", "gguf/t-q8_0.gguf", "gguf/t-lora.gguf"} <= set(files), \
        "checksummed and pulled with the outputs"


def test_metadata_and_vocabulary_are_complete(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported / "merged")
    reader, _ = read(exported / "gguf" / "t-q8_0.gguf")
    assert field(reader, "general.architecture") == "llama"
    assert [field(reader, f"llama.{key}") for key in ("block_count", "embedding_length", "feed_forward_length",
                                                      "attention.head_count", "attention.head_count_kv",
                                                      "rope.dimension_count", "context_length")] == \
        [2, 64, 176, 4, 2, 16, 4096]
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) == 259 and tokens == tokenizer.convert_ids_to_tokens(list(range(259)))
    types = field(reader, "tokenizer.ggml.token_type")
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3 and types[100] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    # llama.cpp refuses a gpt2 vocabulary without merges; the byte tokenizer's one merge makes no token
    (merge,) = field(reader, "tokenizer.ggml.merges")
    assert len(merge.split(" ")) == 2 and merge.replace(" ", "") not in tokens
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_other_architectures_are_refused_by_name_before_training(tmp_path):
    from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM

    from cloudtune.train.model import build_byte_tokenizer

    model_dir = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=259)).save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, ALPACA, model={"name": str(model_dir)}, outputs={"gguf": ["q8_0"]})
    with pytest.raises(CloudtuneError, match=r"GGUF export supports the Llama layout \(LlamaForCausalLM, "
                                             r"MistralForCausalLM\); this model is Qwen2ForCausalLM"):
        run(recipe, tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.jsonl").exists(), "refused before any step"
    scaled = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}, architectures=["LlamaForCausalLM"])
    with pytest.raises(CloudtuneError, match="scales its rotary embedding"):
        check_supported(scaled)


def test_export_after_the_fact_from_a_run_without_gguf(tmp_path):
    recipe = make_recipe(tmp_path, ALPACA, training={"max_steps": 2})
    out = tmp_path / "out"
    run(recipe, out)
    result = CliRunner().invoke(cli, ["export", str(out), "--gguf", "q8_0"])
    assert result.exit_code == 0, result.output
    reader, tensors = read(out / "gguf" / "t-q8_0.gguf")
    assert len(tensors) == 21 and "read back" in result.output
    # the adapter merged onto the base: not the base's weights
    from transformers import AutoModelForCausalLM

    from cloudtune.train.model import tiny_llama_dir

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir()).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(torch.from_numpy(tensors["blk.0.ffn_up.weight"][1].reshape(176, 64)), base, atol=1e-3)


def test_try_answers_from_the_merged_model_with_the_alpaca_prompt(exported):
    """`cloudtune try` on outputs with a merged model loads that, and formats the prompt as alpaca rows were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cloudtune.formats import ALPACA_HEADER

    tokenizer = AutoTokenizer.from_pretrained(exported / "merged")
    model = AutoModelForCausalLM.from_pretrained(exported / "merged").eval()
    prompt = ALPACA_HEADER.format(ctx="") + "### Instruction:\nWhat is 3 plus 4?\n\n### Response:\n"
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    want = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    result = CliRunner(mix_stderr=False).invoke(cli, ["try", str(exported), "What is 3 plus 4?",
                                                      "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == want + "\n" and want.strip()


LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def test_the_lora_adapter_file_is_what_llama_cpp_loads_and_rebuilds_the_merged_weights(exported):
    """base + (B·A)·alpha/r from the adapter file equals the f16 file's merged weights, q and k included."""
    from transformers import AutoModelForCausalLM

    from cloudtune.train.gguf import gguf_tensors
    from cloudtune.train.model import tiny_llama_dir

    reader, adapter = read(exported / "gguf" / "t-lora.gguf")
    assert (field(reader, "general.type"), field(reader, "adapter.type")) == ("adapter", "lora")
    assert field(reader, "general.architecture") == "llama"
    alpha, rank = field(reader, "adapter.lora.alpha"), 8
    assert alpha == 16.0
    assert set(adapter) == {f"blk.{layer}.{name}.weight.lora_{part}" for layer in range(2) for name in LINEAR
                            for part in "ab"}
    assert all(qtype == gguf.GGMLQuantizationType.F32 for qtype, _ in adapter.values())
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # GGUF lists ne: the fastest-moving dimension first
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, rank] and shapes["blk.0.attn_q.weight.lora_b"] == [rank, 64]
    assert shapes["blk.0.ffn_down.weight.lora_a"] == [176, rank] and shapes["blk.0.ffn_down.weight.lora_b"] == [rank,
                                                                                                              64]

    base = dict(gguf_tensors(AutoModelForCausalLM.from_pretrained(tiny_llama_dir())))
    _, merged_file = read(exported / "gguf" / "t-f16.gguf")
    saved = load_file(str(exported / "adapter" / "adapter_model.safetensors"))
    for layer in range(2):
        for name, module in LINEAR.items():
            weight = f"blk.{layer}.{name}.weight"
            a = adapter[f"{weight}.lora_a"][1].reshape(rank, -1)
            b = adapter[f"{weight}.lora_b"][1].reshape(-1, rank)
            rebuilt = base[weight] + (b @ a) * alpha / rank
            want = merged_file[weight][1].reshape(rebuilt.shape)
            assert np.allclose(rebuilt.astype(np.float16).astype(np.float32), want, rtol=2 ** -10, atol=1e-6), weight
            raw_b = saved[f"base_model.model.model.layers.{layer}.{module}.lora_B.weight"].numpy()
            assert np.array_equal(a, saved[f"base_model.model.model.layers.{layer}.{module}.lora_A.weight"].numpy())
            if name in ("attn_q", "attn_k"):  # the rotary reordering, applied to B as to the merged weight
                assert not np.array_equal(b, raw_b) and sorted(b.ravel()) == sorted(raw_b.ravel())
            else:
                assert np.array_equal(b, raw_b)


@pytest.mark.parametrize(("sections", "said"), [
    ({"method": "full", "lora": None}, r"outputs\.gguf: 'lora' writes the LoRA adapter alone, and method 'full'"),
    ({"lora": {"r": 8, "alpha": 16, "use_dora": True}}, r"lora\.use_dora: llama\.cpp's LoRA adapter file has no "
                                                        r"place for DoRA"),
    ({"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "embed_tokens"]}},
     r"lora\.target_modules: embed_tokens: outside the Llama layout's linear layers"),
])
def test_what_a_gguf_adapter_cannot_hold_is_refused_when_the_recipe_is_read(tmp_path, sections, said):
    import re

    recipe = make_recipe(tmp_path, ALPACA, outputs={"gguf": ["lora"]}, **sections)
    if sections.get("lora", 0) is None:
        import yaml

        data = yaml.safe_load(recipe.read_text())
        data.pop("lora")
        recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.search(said, " ".join(result.output.split())), result.output


def test_exporting_the_adapter_of_a_full_fine_tune_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"name": "t", "weights_dir": "model", "format": "alpaca"}))
    from transformers import LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(out / "model")
    result = CliRunner().invoke(cli, ["export", str(out), "--gguf", "lora"])
    assert result.exit_code == 2 and "this run trained every weight: there is no adapter" in result.output
    assert not (out / "gguf").exists()
