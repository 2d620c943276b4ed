#!/usr/bin/env python3
"""Write tasks/data/demo-chat.jsonl: the demo's toy chat, in which Bob answers each of a few questions
the same way every time.

The demo's tiny Llama starts from random weights and a byte tokenizer, and trains on a CPU for seconds:
too little to learn arithmetic (the demo's first data set; its sample stayed noise), enough to learn
that "what colour is the sky?" gets "the sky is blue.". Its samples ask two of these questions, so
the "before" sample is noise and the "after" one is Bob's answer (tests/test_run_local.py checks it).
Seeded: the same file on every run.
"""
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tasks" / "data" / "demo-chat.jsonl"
ANSWERS = {
    "hello!": "hello Alice!",
    "what is your name?": "my name is Bob.",
    "what colour is the sky?": "the sky is blue.",
    "how many legs has a cat?": "a cat has four legs.",
    "what do cows drink?": "cows drink water.",
    "where is Paris?": "Paris is in France.",
    "thanks!": "you are welcome.",
    "bye!": "goodbye Alice!",
}
CONVERSATIONS = 240
MOST_TURNS = 3


def conversations(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pairs = list(ANSWERS.items())
    return ["\n".join(f"### Alice: {question}\n### Bob: {answer}"
                      for question, answer in rng.sample(pairs, rng.randint(1, MOST_TURNS)))
            for _ in range(CONVERSATIONS)]


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps({"text": text}) + "\n" for text in conversations()))
    print(f"wrote {CONVERSATIONS} conversations to {OUT}", file=sys.stderr)
