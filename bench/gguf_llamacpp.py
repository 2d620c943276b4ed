"""llama.cpp itself against transformers on cloudtune's GGUF files: the f16 and q8_0 files of the merged
tiny model, and the f16 base with the LoRA adapter file applied by llama.cpp. CPU only, no network.

    pip install llama-cpp-python      # builds llama.cpp from source: many minutes on 2 cores
    python bench/gguf_llamacpp.py [--steps 20]

Trains the tiny Llama a few LoRA steps with outputs.gguf [f16, q8_0, lora] and outputs.merge, writes the
untouched base as f16 GGUF too, then feeds the same token ids to llama.cpp (llama-cpp-python, every
position's logits) and to the merged model in transformers (float32). Prints one JSON line per file and
appends it to bench/results/gguf_llamacpp.jsonl: the largest logit difference, as a share of the largest
logit, and how often the top token agrees. A file passes within TOLERANCE of its kind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, record

sys.path.insert(0, str(REPO))

# Largest |llama.cpp logit - transformers logit| over every position of every prompt, as a share of the
# largest |logit|: f16 rounds each weight to 11 significant bits, q8_0 to 8 bits per block of 32.
TOLERANCE = {"f16": 0.01, "q8_0": 0.05, "lora": 0.01}
PROMPTS = ["What is 3 plus 4?", "Below is an instruction that describes a task.", "9 + 9 = 18, and 7 + 5 = 12"]


def train_tiny(folder: Path, steps: int) -> Path:
    from cloudtune.recipe import load_recipe
    from cloudtune.train.loop import train

    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"}
            for a in range(2, 10) for b in range(2, 10)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {"name": "parity", "model": {"init": "tiny-llama"}, "method": "lora",
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "dataset": {"path": "data.jsonl"},
              "training": {"max_steps": steps, "learning_rate": 0.01, "micro_batch_size": 4, "max_seq_len": 256},
              "outputs": {"merge": True, "gguf": ["f16", "q8_0", "lora"]}}
    import yaml

    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(folder / "recipe.yaml"), folder / "out")
    return folder / "out"


def base_f16(out: Path) -> Path:
    """The base model without the adapter, as llama.cpp's --lora wants it under the adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cloudtune.train.gguf import write_gguf
    from cloudtune.train.model import tiny_llama_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    return write_gguf(model, AutoTokenizer.from_pretrained(tiny_llama_dir()), out / "gguf" / "base-f16.gguf", "f16",
                      "base")


def transformers_logits(out: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in prompts]


def llamacpp_logits(model_path: Path, prompts: list[list[int]], lora: Path | None = None) -> list[np.ndarray]:
    from llama_cpp import Llama

    options = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(model_path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0,
                **options)
    found = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        found.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return found


def compare(kind: str, got: list[np.ndarray], want: list[np.ndarray]) -> dict:
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    scale = max(float(np.abs(w).max()) for w in want)
    agree = np.mean(np.concatenate([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want, strict=True)]))
    share = worst / scale
    return {"kind": kind, "max_abs_diff": round(worst, 6), "max_abs_logit": round(scale, 4),
            "max_diff_share": round(share, 6), "top1_agreement": round(float(agree), 4),
            "tolerance_share": TOLERANCE[kind], "within_tolerance": share <= TOLERANCE[kind]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="LoRA steps before exporting")
    args = parser.parse_args()
    import llama_cpp
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        out = train_tiny(Path(scratch), args.steps)
        tokenizer = AutoTokenizer.from_pretrained(out / "merged")
        prompts = [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
                   for text in PROMPTS]
        want = transformers_logits(out, prompts)
        files = {"f16": (out / "gguf" / "parity-f16.gguf", None), "q8_0": (out / "gguf" / "parity-q8_0.gguf", None),
                 "lora": (base_f16(out), out / "gguf" / "parity-lora.gguf")}
        for kind, (model_path, lora) in files.items():
            row = compare(kind, llamacpp_logits(model_path, prompts, lora), want)
            if lora:  # the control: the base alone is far from the merged model, so the adapter did the rest
                row["without_adapter_max_diff_share"] = compare(kind, llamacpp_logits(model_path, prompts),
                                                                want)["max_diff_share"]
            record("gguf_llamacpp", {**row, "prompts": len(prompts), "positions": sum(map(len, prompts)),
                                     "steps": args.steps, "llama_cpp_python": llama_cpp.__version__,
                                     "machine": platform.machine(), "cpus": os.cpu_count(),
                                     "load": round(os.getloadavg()[0], 2), "python": platform.python_version()})


if __name__ == "__main__":
    main()
