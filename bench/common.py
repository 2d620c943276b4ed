"""What the GPU benchmarks share: a random Llama of a real shape, guanaco-like data, a result log.

Nothing can be downloaded on the GPU machine, so the model is random weights of the real shape
(what costs time is the shape, not the values) and the data is synthetic token sequences whose
lengths follow guanaco's: lognormal, median ≈ 350 tokens, capped at 1024.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # a smoke-test shape: the scripts' plumbing on a CPU in seconds
    "mini": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}
RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def train_cloudtune(recipe: Path, out: Path, torchrun: bool = False) -> subprocess.CompletedProcess:
    """Run this checkout's trainer as a rented machine runs it: `python -m cloudtune.train`, or with
    `torchrun` under torch.distributed.run with one process (what a multi-GPU launch adds, at world size 1)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun else []
    return subprocess.run([sys.executable, *launcher, "-m", "cloudtune.train", str(recipe), "--out", str(out)],
                          env=env, capture_output=True, text=True)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer where the word `t<id>` is token <id>: synthetic text maps 1:1 to ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>")
    return tokenizer


def make_model(out: Path, shape: str = "7b") -> Path:
    """Write a random Llama of the given shape (bf16, on the GPU: seconds for 7B)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    word_tokenizer(config.vocab_size).save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the profiles run in child processes and need the whole GPU
    return out


def guanaco_lengths(n: int, cap: int = 1024, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [int(min(cap, max(16, rng.lognormvariate(math.log(350), 0.8)))) for _ in range(n)]


def write_dataset(path: Path, n: int, vocab_size: int = 32000, seed: int = 0) -> Path:
    """Completion-format jsonl whose documents tokenize to guanaco-like lengths (BOS/EOS included)."""
    rng = random.Random(seed + 1)
    with path.open("w") as handle:
        for length in guanaco_lengths(n, seed=seed):
            words = " ".join(f"t{rng.randrange(3, vocab_size)}" for _ in range(length - 2))
            handle.write(json.dumps({"text": words}) + "\n")
    return path


def bf16_peak_tflops(tokens: int = 8192, shapes=((4096, 11008), (11008, 4096), (4096, 4096))) -> float:
    """The GPU's bf16 matmul rate, measured here at the 7B layer shapes (the best of them, as TFLOP/s),
    on random data: MFU's denominator, since datasheet peaks are not reached by any real matmul."""
    import torch
    from triton.testing import do_bench

    best = 0.0
    for features_in, features_out in shapes:
        inputs = torch.randn(tokens, features_in, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(features_out, features_in, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(partial(torch.matmul, inputs, weight.t()), warmup=100, rep=400, return_mode="median")
        best = max(best, 2 * tokens * features_in * features_out / (ms * 1e-3) / 1e12)
        del inputs, weight
    torch.cuda.empty_cache()
    return best


def record(name: str, row: dict) -> None:
    """Print one result line and append it to bench/results/<name>.jsonl (and $OUT when set)."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
    line = json.dumps(row)
    print(line, flush=True)
    RESULTS.mkdir(exist_ok=True)
    for folder in filter(None, [RESULTS, os.environ.get("OUT")]):
        with (Path(folder) / f"{name}.jsonl").open("a") as handle:
            handle.write(line + "\n")
