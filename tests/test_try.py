"""`cloudtune try RUN [PROMPT]`: the run's model answers, streamed, to a prompt formatted as training did.

One tiny chat run with `dataset.chat_template: chatml` (adapter only, so `try` puts it on the base),
trained once in this process; the reference answers come from model.generate on a prompt this file
renders itself, not through cloudtune's rendering.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cloudtune.cli import cli

from .conftest import REPO, module_home
from .test_train import PROBLEMS, make_recipe, run

# answers long enough that a few steps teach the tiny model to say something before its EOS
CHAT = [{"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}, as counting on your fingers shows."}]}
        for a, b in PROBLEMS]
PROMPTS = ["3 plus 4?", "9 plus 9?"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def chat_run(shared_home, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("try")
    with module_home(shared_home, tmp_path_factory):
        recipe = make_recipe(folder, CHAT, dataset={"completions_only": True, "chat_template": "chatml"},
                             training={"max_steps": 8})
        run(recipe, folder / "out")
    return folder / "out"


@pytest.fixture(scope="module")
def references(chat_run) -> dict[str, str]:
    """model.generate, greedy, on the base with the adapter, for each prompt in ChatML as training saw it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cloudtune.train.model import tiny_llama_dir

    tokenizer = AutoTokenizer.from_pretrained(chat_run / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir()), str(chat_run / "adapter"))
    answers = {}
    for prompt in PROMPTS:
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            generated = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        answers[prompt] = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    return answers


def test_the_streamed_answer_is_what_generate_gives_for_the_training_format(chat_run, references):
    pieces = []
    from cloudtune.train import inference

    trained = inference.load_trained(chat_run)
    assert trained.render(PROMPTS[0]) == f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n"
    full = inference.generate(trained.model, trained.tokenizer, trained.render(PROMPTS[0]), max_new_tokens=NEW_TOKENS,
                              write=pieces.append)
    assert len(pieces) > 1, "streamed in pieces, not printed at the end"
    assert "".join(pieces) == full == references[PROMPTS[0]]

    result = CliRunner(mix_stderr=False).invoke(cli, ["try", str(chat_run), PROMPTS[0], "--max-new-tokens",
                                                      str(NEW_TOKENS)])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout == references[PROMPTS[0]] + "\n"


def test_without_a_prompt_it_answers_each_line_until_end_of_input(chat_run, references):
    lines = f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n"  # an empty line asks nothing
    result = CliRunner(mix_stderr=False).invoke(cli, ["try", str(chat_run), "--max-new-tokens", str(NEW_TOKENS)],
                                                input=lines)
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout == f"{references[PROMPTS[0]]}\n{references[PROMPTS[1]]}\n", "answers alone, in order"
    assert result.stderr.count("> ") == 4 and "Ctrl-D" in result.stderr and "Traceback" not in result.stderr


def test_sampling_with_a_temperature_differs_from_greedy_and_still_streams(chat_run, references):
    torch.manual_seed(0)
    result = CliRunner(mix_stderr=False).invoke(cli, ["try", str(chat_run), PROMPTS[1], "--temperature", "5",
                                                      "--max-new-tokens", str(NEW_TOKENS)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout != references[PROMPTS[1]] + "\n"


class CtrlC(io.BytesIO):
    """A terminal whose user presses Ctrl-C while the prompt waits: the read raises KeyboardInterrupt."""

    def read(self, size: int | None = -1) -> bytes:
        if size == 0:
            return b""
        raise KeyboardInterrupt

    read1 = readline = read


def test_ctrl_c_at_the_prompt_ends_cleanly(chat_run):
    result = CliRunner(mix_stderr=False).invoke(cli, ["try", str(chat_run)], input=CtrlC())
    assert result.exit_code == 0, result.stderr
    assert result.exception is None and "Traceback" not in result.stderr and "> " in result.stderr


def test_a_laptop_install_without_torch_is_told_what_to_install(chat_run):
    blocked = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'cloudtune'; "
               "from cloudtune.cli import main; main()")
    process = subprocess.run([sys.executable, "-c", blocked, "try", str(chat_run), "hi"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    stderr = process.stderr
    assert process.returncode == 2, stderr
    assert "cloudtune try needs the training packages (torch is missing)" in stderr
    assert "pip install 'cloudtune[train]'" in stderr and "Traceback" not in stderr


def test_a_run_that_does_not_exist_or_has_no_outputs_is_one_message(tmp_path):
    from cloudtune.ledger import Ledger

    missing = CliRunner().invoke(cli, ["try", "nosuchrun", "hi"])
    assert missing.exit_code == 2 and "no run 'nosuchrun'" in missing.output
    empty = CliRunner().invoke(cli, ["try", str(tmp_path), "hi"])
    assert empty.exit_code == 2 and "no run.json here" in empty.output
    run_id = Ledger().add_new_run(name="t", backend="local")
    pending = CliRunner().invoke(cli, ["try", run_id, "hi"])
    assert pending.exit_code == 2 and f"run {run_id} (planned): no outputs" in pending.output
    assert all("Traceback" not in r.output for r in (missing, empty, pending))
