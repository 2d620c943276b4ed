"""The training entrypoint end to end on the tiny model: methods, outputs, trackers, resume, errors.

Runs `cloudtune.train.loop.train` in-process where the process itself is not the point (a Python
start with torch costs ~4 s); the exit codes and the kill/resume cases use the real
`python -m cloudtune.train`.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cloudtune.errors import CloudtuneError
from cloudtune.recipe import load_recipe
from cloudtune.train.__main__ import main as train_main
from cloudtune.train.loop import train
from cloudtune.train.model import tiny_llama_dir
from cloudtune.train.verify import max_logit_difference

from .conftest import module_home

PROBLEMS = [(a, b) for a in range(2, 10) for b in range(2, 10)]
ALPACA = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"} for a, b in PROBLEMS]
CHAT = [{"messages": [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
        for a, b in PROBLEMS]
LLAMA = [{"text": f"<s>[INST] {a} plus {b}? [/INST] {a + b} </s>"} for a, b in PROBLEMS]


def make_recipe(folder: Path, rows: list[dict], **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    training = {"max_steps": 40, "learning_rate": 0.01, "micro_batch_size": 4, "max_seq_len": 256, "warmup_ratio": 0.1,
                "seed": 7, **sections.pop("training", {})}
    data = {"name": "t", "model": {"init": "tiny-llama"}, "method": sections.pop("method", "lora"),
            "dataset": {"path": "data.jsonl", **sections.pop("dataset", {})}, "training": training, **sections}
    if data["method"] != "full":
        data.setdefault("lora", {"r": 8, "alpha": 16, "dropout": 0.0})
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(recipe_path: Path, out: Path, resume: bool = False) -> dict:
    return train(load_recipe(recipe_path), out, resume=resume)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_learned(out: Path) -> None:
    losses = [row["loss"] for row in metrics(out)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3, f"loss did not go down: {losses}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ----------------------------------------------------------------------------------------------
# methods and outputs


def test_lora_completions_only_with_truncation_samples_and_tensorboard(tmp_path, capsys):
    rows = ALPACA + [{"instruction": "long " * 60, "input": "", "output": "x"}]
    recipe = make_recipe(tmp_path, rows, dataset={"completions_only": True}, tracking="tensorboard",
                         training={"max_seq_len": 200},  # the long row is cut before its answer
                         outputs={"samples": ["What is 3 plus 4?", "What is 9 plus 9?"], "sample_max_new_tokens": 8})
    out = tmp_path / "out"
    summary = run(recipe, out)
    log = capsys.readouterr().out
    assert "note: 1 of 65 rows were longer than max_seq_len=200 and were truncated" in log
    assert "note: 1 rows have no answer tokens left" in log
    assert summary["truncated_rows"] == json.loads((out / "run.json").read_text())["truncated_rows"] == 1
    assert summary["format"] == "alpaca" and summary["steps"] == 40
    assert 0 < summary["trained_tokens"] < summary["tokens"] / 10, "completions only: prompts carry no loss"
    assert summary["tokens_per_s"] > 0 and summary["peak_gpu_gib"] is None
    assert_learned(out)
    assert max_logit_difference(out, str(tiny_llama_dir())) < 1e-4

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["What is 3 plus 4?", "What is 9 plus 9?"]
    assert all(isinstance(s["tuned"], str) and isinstance(s["base"], str) for s in samples)
    assert any(s["tuned"] != s["base"] for s in samples), "training changed nothing the samples can show"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == list(range(1, 41))
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"adapter/adapter_model.safetensors", "run.json", "samples.jsonl", "probe.safetensors"} <= set(files)
    assert any(name.startswith("tensorboard/") for name in files)


def test_full_fine_tune_saves_a_model_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(tmp_path, CHAT, method="full", training={"learning_rate": 0.003, "optimizer": "adamw_8bit"},
                         outputs={"samples": ["2 plus 2?"], "sample_max_new_tokens": 4})
    out = tmp_path / "out"
    summary = run(recipe, out)
    assert summary["weights_dir"] == "model" and summary["format"] == "chat"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
    assert_learned(out)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert max_logit_difference(out, str(tiny_llama_dir())) < 1e-4
    sample, = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert isinstance(sample["base"], str) and isinstance(sample["tuned"], str)


def test_fp16_trains_lora_with_loss_scaling_and_resumes_with_its_scale(tmp_path):
    """The path of GPUs without bf16 (T4, V100), on the CPU: forwards autocast to fp16, the loss is
    scaled so small gradients survive, and a resumed run goes on as the uninterrupted one did."""
    import shutil

    from cloudtune.train.verify import logit_differences, tolerance

    recipe = make_recipe(tmp_path, ALPACA, training={"precision": "fp16", "checkpoint_steps": 10})
    out = tmp_path / "out"
    summary = run(recipe, out)
    assert summary["autocast"] == "float16"
    rows = metrics(out)
    scales = [row["loss_scale"] for row in rows]
    assert scales[0] == 2.0 ** 16 and all(math.isfinite(row["loss"]) for row in rows)
    assert_learned(out)
    difference, scale, _ = logit_differences(out, str(tiny_llama_dir()))
    assert difference <= tolerance(scale, out)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000020", resumed / "checkpoints" / "step-00000020")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    run(recipe, resumed, resume=True)
    again = metrics(resumed)
    assert [row["loss_scale"] for row in again] == scales
    assert [row["loss"] for row in again] == pytest.approx([row["loss"] for row in rows], rel=1e-4)


def test_an_overflowing_fp16_step_is_skipped_and_the_lowered_scale_is_checkpointed(tmp_path):
    from cloudtune.train import checkpoint
    from cloudtune.train import model as model_lib
    from cloudtune.train.loop import StepContext, make_optimizer, train_step

    recipe = load_recipe(make_recipe(tmp_path, ALPACA, training={"precision": "fp16"}))
    cpu = torch.device("cpu")
    model = model_lib.prepare_for_training(recipe, model_lib.load_base(recipe, cpu), 0, autocast=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, trainable, cpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # past fp16's 65504: the gradients overflow
    context = StepContext(optimizer, scheduler, scaler, trainable, 1.0, model_lib.choose_precision(recipe, cpu), cpu)
    ids = torch.arange(3, 35).unsqueeze(0)
    before = [p.detach().clone() for p in trainable]
    loss, _, grad_norm = train_step(model, [({"input_ids": ids, "labels": ids}, 32)], context)
    assert math.isfinite(loss) and grad_norm is None
    assert all(torch.equal(a, b) for a, b in zip(before, trainable, strict=True)), "an overflowed step was applied"
    assert scaler.get_scale() == 2.0 ** 39

    # a step that ran out of memory after unscaling is redone with a scaler that has not seen it
    batch = {"input_ids": ids, "labels": ids}
    with model_lib.mixed_precision(context.precision, cpu):
        scaler.scale(model(**batch).loss).backward()
    scaler.unscale_(optimizer)
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="unscale_"):
        train_step(model, [(batch, 32)], context)
    optimizer.zero_grad(set_to_none=True)
    redo = context.for_a_redone_step()
    assert redo.scaler.get_scale() == 2.0 ** 39
    train_step(model, [(batch, 32)], redo)

    (tmp_path / "out").mkdir()
    saved = checkpoint.save(tmp_path / "out", recipe, model, optimizer, scheduler, checkpoint.State(step=1), scaler)
    fresh = torch.amp.GradScaler("cpu")
    checkpoint.restore_latest(tmp_path / "out", recipe, model, optimizer, scheduler, fresh)
    assert saved.name == "step-00000001" and fresh.get_scale() == 2.0 ** 39


def test_dora_rslora_merge_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = make_recipe(tmp_path, LLAMA, lora={"r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True,
                                                "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
                         tracking={"service": "wandb", "project": "ct-test"}, outputs={"merge": True},
                         training={"max_steps": 12})
    out = tmp_path / "out"
    summary = run(recipe, out)
    assert summary["format"] == "llama2-inst" and summary["merged_dir"] == "merged"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert max_logit_difference(out, str(tiny_llama_dir())) < 1e-4

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = load_file(str(out / "probe.safetensors"))["input_ids"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir()), str(out / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())(input_ids=ids).logits
    assert (base - adapted(input_ids=ids).logits).abs().max() > 1e-3, "the adapter must change the model"

    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1, list((out / "wandb").iterdir())
    assert list(run_dirs[0].glob("run-*.wandb")), "W&B wrote no run file"
    assert (out / "wandb-run-id").read_text() in run_dirs[0].name


def test_gradient_checkpointing_changes_nothing_and_seeds_decide_everything(tmp_path):
    def losses_and_adapter(name: str, **training) -> tuple[list[float], dict, dict]:
        recipe = make_recipe(tmp_path / name, ALPACA, lora={"r": 8, "alpha": 16, "dropout": 0.1},
                             training={"max_steps": 8, **training})
        summary = run(recipe, tmp_path / name / "out")
        out = tmp_path / name / "out"
        return [row["loss"] for row in metrics(out)], weights(out / "adapter" / "adapter_model.safetensors"), summary

    off, off_weights, off_summary = losses_and_adapter("off", gradient_checkpointing="off")
    on, on_weights, on_summary = losses_and_adapter("on", gradient_checkpointing="on")
    auto, auto_weights, auto_summary = losses_and_adapter("auto", gradient_checkpointing="auto")
    other, other_weights, _ = losses_and_adapter("seed", gradient_checkpointing="off", seed=8)
    assert (off_summary["gradient_checkpointing"], on_summary["gradient_checkpointing"],
            auto_summary["gradient_checkpointing"]) == (False, True, False)  # auto: off without a GPU
    assert on == pytest.approx(off, abs=1e-5)
    for name, tensor in off_weights.items():
        torch.testing.assert_close(on_weights[name], tensor, atol=1e-6, rtol=1e-5)
        assert torch.equal(auto_weights[name], tensor), "the same seed must give the same adapter"
    assert other != off and any(not torch.equal(other_weights[k], v) for k, v in off_weights.items())


@pytest.mark.parametrize("packing", [True, False])
def test_document_attention_trains_as_masked_sdpa_does(tmp_path, packing):
    """The GPU default cuts rows into documents by offsets; the CPU runs the same path document by document."""
    def losses(attention: str) -> tuple[list[float], dict]:
        recipe = make_recipe(tmp_path / attention, ALPACA, training={"max_steps": 6, "micro_batch_size": 4,
                                                                     "packing": packing, "attention": attention})
        summary = run(recipe, tmp_path / attention / "out")
        return [row["loss"] for row in metrics(tmp_path / attention / "out")], summary

    masked, masked_summary = losses("sdpa")
    by_documents, summary = losses("documents")
    assert (masked_summary["attention"], summary["attention"]) == ("sdpa", "documents")
    assert by_documents == pytest.approx(masked, abs=1e-4)
    assert max_logit_difference(tmp_path / "documents" / "out", str(tiny_llama_dir())) < 1e-4


def test_out_of_memory_under_auto_checkpointing_recomputes_every_layer_and_goes_on(tmp_path, monkeypatch, capsys):
    from cloudtune.train import loop

    real_step, calls = loop.train_step, []

    def step_that_runs_out_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # a CUDA OOM cannot happen on this machine: the GPU's answer, injected
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_that_runs_out_once)
    recipe = make_recipe(tmp_path, ALPACA, training={"max_steps": 4})
    summary = run(recipe, tmp_path / "out")
    assert "note: out of GPU memory at step 3 with gradient checkpointing off; checkpointing all 2 layers" in \
        capsys.readouterr().out
    assert summary["steps"] == 4 and summary["checkpointed_layers"] == 2 and summary["gradient_checkpointing"]
    assert [row["step"] for row in metrics(tmp_path / "out")] == [1, 2, 3, 4]

    calls.clear()
    recipe = make_recipe(tmp_path / "off", ALPACA, training={"max_steps": 4, "gradient_checkpointing": "off"})
    with pytest.raises(CloudtuneError, match="out of GPU memory at step 3: 4 rows of up to 256 tokens with "
                                             "gradient checkpointing off"):  # the user chose none: theirs to change
        run(recipe, tmp_path / "off" / "out")


def test_quantised_methods_need_an_nvidia_gpu(tmp_path, capsys):
    recipe = make_recipe(tmp_path / "q", ALPACA, method="qlora")
    result = subprocess.run([sys.executable, "-m", "cloudtune.train", str(recipe), "--out", str(tmp_path / "q-out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "method 'qlora' quantises with bitsandbytes, which needs an NVIDIA GPU" in result.stderr
    assert "Traceback" not in result.stderr

    recipe = make_recipe(tmp_path / "8", ALPACA, method="8bit")
    assert train_main([str(recipe), "--out", str(tmp_path / "8-out")]) == 2
    assert "method '8bit' quantises with bitsandbytes, which needs an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "8-out").exists(), "nothing may be written before the method is known to work here"


# ----------------------------------------------------------------------------------------------
# resume


RESUMABLE_STEPS = 30  # checkpoints every 5: a kill at step 17 loses two steps, a SIGTERM at 12 none
RESUMABLE = dict(lora={"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the RNG state must resume too
                 training={"max_steps": RESUMABLE_STEPS, "checkpoint_steps": 5, "gradient_accumulation": 2,
                           "lr_scheduler": "cosine", "micro_batch_size": 2})


@pytest.fixture(scope="module")
def resumable(shared_home, tmp_path_factory) -> tuple[Path, Path]:
    """The resumable recipe and its uninterrupted run, trained once for every resume test."""
    with module_home(shared_home, tmp_path_factory):
        folder = tmp_path_factory.mktemp("resumable")
        recipe = make_recipe(folder, ALPACA, **RESUMABLE)
        run(recipe, folder / "reference")
    return recipe, folder / "reference"


def interrupted(recipe: Path, out: Path, sig: int, after_step: int) -> subprocess.CompletedProcess:
    """Start the real entrypoint, and send `sig` once it has logged `after_step`."""
    process = subprocess.Popen([sys.executable, "-m", "cloudtune.train", str(recipe), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"step {after_step}/"):
            process.send_signal(sig)
            break
    rest = process.communicate(timeout=60)[0]
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(seen) + rest)


def assert_same_run(out: Path, reference: Path) -> None:
    adapter = weights(out / "adapter" / "adapter_model.safetensors")
    expected = weights(reference / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    # Float summation order may still differ in the last bits between processes (~4e-6 seen); a resume
    # that loses the RNG, optimiser or scheduler state is off by ~1e-1, so 2e-5 tells the two apart.
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, atol=2e-5, rtol=1e-4)
    mine, theirs = metrics(out), metrics(reference)
    assert [row["step"] for row in mine] == list(range(1, RESUMABLE_STEPS + 1))
    for key in ("loss", "lr", "tokens", "step_tokens", "trained_tokens"):
        assert [row[key] for row in mine] == pytest.approx([row[key] for row in theirs], rel=1e-5), key
    assert json.loads((out / "run.json").read_text())["tokens"] == json.loads((reference / "run.json").read_text())[
        "tokens"]


def test_killed_run_resumes_to_the_same_adapter(tmp_path, resumable):
    recipe, reference = resumable
    out = tmp_path / "killed"
    killed = interrupted(recipe, out, signal.SIGKILL, after_step=17)
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    assert not (out / "run.json").exists(), "the run finished before it could be killed"
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps and len(steps) <= 2, steps  # older checkpoints are pruned
    assert int(steps[-1].split("-")[1]) % 5 == 0

    summary = run(recipe, out, resume=True)
    assert summary["steps"] == RESUMABLE_STEPS
    assert_same_run(out, reference)

    with pytest.raises(CloudtuneError, match="holds checkpoints of an earlier run"):
        run(recipe, out)  # without --resume, a directory with checkpoints is not silently reused
    changed = make_recipe(tmp_path / "changed", ALPACA, **{**RESUMABLE, "training": {**RESUMABLE["training"],
                                                                                      "learning_rate": 0.02}})
    with pytest.raises(CloudtuneError, match="made with different model/method/lora/dataset/training settings"):
        run(changed, out, resume=True)


def test_sigterm_checkpoints_at_once_and_resumes_to_the_same_adapter(tmp_path, resumable):
    recipe, reference = resumable
    out = tmp_path / "stopped"
    stopped = interrupted(recipe, out, signal.SIGTERM, after_step=12)
    assert stopped.returncode == 143, stopped.stdout
    line = next(line for line in stopped.stdout.splitlines() if line.startswith("stopped by SIGTERM after step "))
    step = int(line.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step:08d}" / "state.pt").is_file()
    assert not (out / "run.json").exists()

    assert train_main([str(recipe), "--out", str(out), "--resume"]) == 0
    assert_same_run(out, reference)


def test_a_checkpoint_without_its_marker_is_skipped_on_resume(tmp_path, capsys):
    """A bucket mount copies a checkpoint folder file by file: a preempted machine leaves a step-N folder
    without its marker (written last), which neither resume nor the "earlier run" check may take."""
    from cloudtune.train import checkpoint

    recipe = make_recipe(tmp_path, ALPACA, training={"max_steps": 6, "checkpoint_steps": 2})
    out = tmp_path / "out"
    run(recipe, out)
    saved = checkpoint.complete(out)
    assert [p.name for p in saved] == ["step-00000002", "step-00000004"]
    assert all((p / checkpoint.COMPLETE).is_file() for p in saved)
    half = out / "checkpoints" / "step-00000005"
    shutil.copytree(saved[-1], half)
    (half / checkpoint.COMPLETE).unlink()
    (half / "state.pt").write_bytes((half / "state.pt").read_bytes()[:100])  # cut off mid-copy
    capsys.readouterr()

    summary = run(recipe, out, resume=True)
    assert "resumed from step 4" in capsys.readouterr().out and summary["steps"] == 6
    assert [row["step"] for row in metrics(out)] == list(range(1, 7))

    fresh = tmp_path / "fresh"
    shutil.copytree(half, fresh / "checkpoints" / half.name)
    assert run(recipe, fresh)["steps"] == 6  # only a half-copied folder: no earlier run to protect


def test_push_needs_a_token_up_front_and_a_failed_push_keeps_the_outputs(tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, ALPACA, outputs={"push_to_hub": "someone/adapter"}, secrets=["HF_TOKEN"],
                         training={"max_steps": 2})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert train_main([str(recipe), "--out", str(tmp_path / "no-token")]) == 2
    assert "outputs.push_to_hub 'someone/adapter' needs HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "no-token").exists(), "a missing token must stop the run before training, not after"

    secret = "hf_" + "pushTokenValue" * 3
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable, as it is here anyway
    out = tmp_path / "out"
    summary = run(recipe, out)
    assert "warning: push to hub someone/adapter failed" in capsys.readouterr().out
    assert summary["push_to_hub"]["repo"] == "someone/adapter" and summary["push_to_hub"]["ok"] is False
    assert json.loads((out / "run.json").read_text())["push_to_hub"]["ok"] is False
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "manifest.json").is_file()
    assert not any(secret in path.read_text(errors="replace") for path in out.rglob("*") if path.is_file())


def test_wandb_without_a_key_is_a_user_error(tmp_path, monkeypatch, capsys):
    import wandb

    wandb.teardown()  # W&B keeps its settings per process; an earlier offline test must not leak into this one
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    recipe = make_recipe(tmp_path, ALPACA, tracking="wandb", training={"max_steps": 2})
    assert train_main([str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tracking: W&B could not start a run" in err and "WANDB_MODE=offline" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_loss_that_turns_nan_stops_the_training_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    from cloudtune.train import loop

    real_step = loop.train_step
    calls = []

    def diverging(model, group, context, share=None):
        loss, items, norm = real_step(model, group, context, share)
        calls.append(loss)
        return (float("nan"), items, norm) if len(calls) > 4 else (loss, items, norm)

    monkeypatch.setattr(loop, "train_step", diverging)
    recipe = make_recipe(tmp_path, ALPACA, training={"max_steps": 10, "checkpoint_steps": 2})
    out = tmp_path / "out"
    with pytest.raises(CloudtuneError) as stopped:
        run(recipe, out)
    assert "step 5: the loss is nan" in stopped.value.message
    assert "checkpoints/step-00000004" in stopped.value.message and "learning_rate" in stopped.value.hint
    assert not (out / "run.json").exists() and not (out / "manifest.json").exists()  # nothing to pull as a success


def test_building_the_kernels_variants_leaves_rng_gradients_and_weights_as_they_were(ct_home):
    """The two small passes before the first step (loop.build_kernel_variants) carry 16 and 17 trained
    tokens, one count of each kind Triton builds a kernel for, and change nothing a step then sees."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cloudtune.train.data import IGNORE, Batcher, Encoded
    from cloudtune.train.loop import StepContext, build_kernel_variants
    from cloudtune.train.model import Precision

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir()),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        (int((kwargs["labels"][:, 1:] != IGNORE).sum()), kwargs["num_items_in_batch"], kwargs["input_ids"].shape)),
        with_kwargs=True)
    batcher = Batcher(Encoded(examples=[([3, 4, 5], [IGNORE, 4, 5])], format="completion"), micro_batch_size=2,
                      max_seq_len=64, packing=True, seed=0, pad_id=2, document_offsets=True)
    step = StepContext(optimizer=torch.optim.AdamW(trainable), scheduler=None, scaler=None, trainable=trainable,
                       max_grad_norm=None,
                       precision=Precision(torch.float32, None), device=torch.device("cpu"))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()

    build_kernel_variants(model, batcher, step, triton_kernels=False)
    assert seen == []  # nothing to build without Triton's kernels
    build_kernel_variants(model, batcher, step, triton_kernels=True)

    assert seen == [(16, 16, (2, 32)), (17, 17, (2, 32))]
    assert all(p.grad is None for p in trainable)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout masks drew from a forked stream
