"""Packing changes the speed, not what is learned: after the same tokens, held-out loss within 2 %."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from cloudtune.recipe import load_recipe
from cloudtune.train.loop import train
from cloudtune.train.model import load_tokenizer, tiny_llama_dir
from cloudtune.train.verify import reload

from .conftest import DEMO_RECIPE

ROWS = [json.loads(line) for line in (DEMO_RECIPE.parent / "data" / "demo-chat.jsonl").read_text().splitlines()]


def trained(tmp_path: Path, name: str, packing: bool, micro_batch_size: int) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:200]))
    recipe = dict(name=name, model={"init": "tiny-llama"}, method="lora",
                  lora={"r": 8, "alpha": 16, "dropout": 0.0},
                  dataset={"path": str(data), "format": "completion"},
                  training={"epochs": 3, "learning_rate": 0.003, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                            "packing": packing, "micro_batch_size": micro_batch_size, "max_seq_len": 256})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path), tmp_path / name)
    return tmp_path / name


def held_out_loss(out: Path) -> float:
    """Mean token loss on documents the run never saw, each scored alone."""
    model = reload(out, str(tiny_llama_dir()), torch.device("cpu")).eval()
    recipe = load_recipe(DEMO_RECIPE)
    tokenizer = load_tokenizer(recipe)
    total = count = 0.0
    with torch.no_grad():
        for row in ROWS[200:]:
            ids = [tokenizer.bos_token_id] + tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ids + [tokenizer.eos_token_id]])
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def test_packed_and_unpacked_training_reach_the_same_held_out_loss(tmp_path):
    packed = trained(tmp_path, "packed", packing=True, micro_batch_size=2)
    unpacked = trained(tmp_path, "unpacked", packing=False, micro_batch_size=6)
    tokens = [json.loads((out / "run.json").read_text())["trained_tokens"] for out in (packed, unpacked)]
    assert tokens[0] == tokens[1], tokens  # the same documents, the same number of times
    packed_loss, unpacked_loss = held_out_loss(packed), held_out_loss(unpacked)
    untrained = json.loads((packed / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert packed_loss < 0.95 * untrained  # both learned something
    print(f"held-out loss: packed {packed_loss:.4f}, unpacked {unpacked_loss:.4f}, untrained {untrained:.4f}")
    assert abs(packed_loss - unpacked_loss) / unpacked_loss < 0.02, (packed_loss, unpacked_loss)
