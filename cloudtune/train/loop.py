"""The training recipe, top to bottom: setup -> train -> save. Runs on the GPU machine.

Progress goes to stdout one line per step (the CLI streams it) and to metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..datasets import split_eval
from ..errors import CloudtuneError
from ..planning.memory import GIB, ModelShape, TrainSetup, checkpointing_note, layers_to_checkpoint
from ..recipe import QUANTISED_METHODS, Recipe, quantising_needs_a_gpu
from ..remote.budget import Budget, read_budget
from . import Stopped, attention, checkpoint, distributed, export, quiet, say, tracking
from . import model as model_lib
from .data import IGNORE, Batcher, Encoded, document_fields, encode, load_rows, on_device, row_width_multiple
from .evaluation import make_evaluation


def preflight(recipe: Recipe, device: torch.device) -> None:
    """Problems that would otherwise surface after the data or the model is loaded, or after training."""
    if recipe.method in QUANTISED_METHODS and device.type != "cuda":
        raise quantising_needs_a_gpu(recipe.method)
    model_lib.choose_precision(recipe, device)  # a GPU without the precision asked for fails before loading
    if recipe.outputs.push_to_hub and not os.environ.get("HF_TOKEN"):
        raise CloudtuneError(f"outputs.push_to_hub '{recipe.outputs.push_to_hub}' needs HF_TOKEN in the environment.",
                             "Add HF_TOKEN to the recipe's secrets and set it where you run cloudtune.")
    if recipe.outputs.gguf:  # a model the exporter would refuse is refused before it is trained
        from .gguf import check_supported

        check_supported(model_lib.load_config(recipe))


def limit_memory(recipe: Recipe, device: torch.device) -> None:
    """Make `training.memory_limit_gib` binding: the allocator refuses to grow past it."""
    limit = recipe.training.memory_limit_gib
    if limit and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit * GIB / total), device)


def checkpointed_layers(recipe: Recipe, config, device: torch.device, longest_row: int | None = None,
                        fused_kernels: bool = False, autocast: bool = True) -> int:
    """How many decoder layers recompute their activations in backward: all (on), none (off), or for
    auto the fewest that let the micro-batch fit in what the GPU has left after loading the model."""
    shape = ModelShape.from_config(config)
    choice = recipe.training.gradient_checkpointing
    if choice != "auto":
        return shape.layers if choice == "on" else 0
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    if recipe.training.memory_limit_gib:
        free = min(free, recipe.training.memory_limit_gib * GIB - torch.cuda.memory_reserved(device))
    # unpacked batches pad to their longest row, as `cloudtune cost` assumes
    width = recipe.training.max_seq_len if recipe.training.packing else min(longest_row or 10**9,
                                                                              recipe.training.max_seq_len)
    tokens = recipe.training.micro_batch_size * width
    setup = TrainSetup.from_recipe(recipe, fused_kernels=fused_kernels, autocast=autocast)
    return layers_to_checkpoint(shape, tokens, free, setup)


def _checkpoint_all_after_oom(recipe: Recipe, model, optimizer, step: int, recomputed: int, layers: int,
                              world: distributed.World) -> int:
    """After an out-of-memory step under auto checkpointing: recompute every layer, so the step can be
    redone (nothing was applied yet) instead of losing the run. Otherwise the settings are the user's.
    Not under torchrun: the other ranks are already in this step's gradient exchange, without this one."""
    spec = recipe.training
    if recomputed == layers or spec.gradient_checkpointing != "auto" or world.distributed:
        raise CloudtuneError(
            f"out of GPU memory at step {step}: {spec.micro_batch_size} rows of up to {spec.max_seq_len} tokens "
            f"with gradient checkpointing {checkpointing_note(recomputed, layers)}.",
            "Set training.gradient_checkpointing to auto or on, or lower micro_batch_size or max_seq_len "
            "(raise gradient_accumulation to keep the effective batch); --resume continues from the last checkpoint.")
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    say(f"note: out of GPU memory at step {step} with gradient checkpointing {checkpointing_note(recomputed, layers)}; "
        f"checkpointing all {layers} layers from here on")
    model_lib.set_checkpointed_layers(model, layers)
    return layers


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter], device: torch.device):
    spec = recipe.training
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                 fused=device.type == "cuda")
    import bitsandbytes as bnb

    # Paged: optimizer states live in CUDA unified memory and spill to host RAM under pressure,
    # which absorbs the memory spikes of long packed rows instead of failing with out-of-memory.
    cls = bnb.optim.AdamW8bit if spec.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def total_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    spec = recipe.training
    if spec.max_steps:
        return spec.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / spec.gradient_accumulation)
    return max(1, math.ceil((spec.epochs or 1.0) * steps_per_epoch))


def train(recipe: Recipe, out: Path, resume: bool = False) -> dict:
    from transformers import get_scheduler, set_seed

    started = time.time()
    spec = recipe.training
    world, device, resume = _join(recipe, out, resume)
    set_seed(spec.seed)
    say(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        + (f", {world.size} processes on {world.nodes} node(s)" if world.distributed else ""))

    tokenizer = model_lib.load_tokenizer(recipe)
    encoded, eval_encoded = encode_data(recipe, tokenizer, world)

    parallelism = distributed.parallelism_for(recipe, world, model_lib.load_config(recipe), device)
    base = model_lib.load_base(recipe, device, sharded=parallelism == "fsdp")
    fused = model_lib.apply_fused_kernels(recipe, base, device)  # on the bare model: Liger walks its layout
    precision = model_lib.choose_precision(recipe, device)
    autocast = precision.autocast is not None
    every_example = encoded.examples + (eval_encoded.examples if eval_encoded else [])
    recomputed = checkpointed_layers(recipe, base.config, device, max(len(ids) for ids, _ in every_example),
                                     fused_kernels=fused, autocast=autocast)
    # FSDP swaps sharded and whole weights around each layer's passes; the fused backward reads the
    # frozen weight itself, which is only checked outside FSDP
    model = model_lib.prepare_for_training(recipe, base, recomputed, autocast=autocast,
                                           fused_lora=fused and parallelism != "fsdp")
    layers = len(model_lib.decoder_layers(model))
    # Before any step, the model is the base (a fresh LoRA adds zero), so these are the "before" samples.
    # FSDP loads the base into host memory to shard it: its samples come from the whole copy made at the end.
    base_samples = export.generate_samples(recipe, model, tokenizer, encoded.format, device) \
        if world.main and parallelism != "fsdp" else []
    trained = distributed.wrap(model, world, device, parallelism)  # what the steps run; `model` for the rest
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    say(f"model: {model_lib.model_source(recipe)} method {recipe.method}, {n_trainable:,} trainable parameters, "
        f"gradient checkpointing {checkpointing_note(recomputed, layers)}, "
        f"fused kernels {'on' if fused else 'off'}, attention {base.config._attn_implementation}"
        + (f", {parallelism} over {world.size} ranks" if world.distributed else ""))
    distributed.seed_ranks(world, spec.seed)  # dropout differs between ranks, as between micro-batches

    per_document = base.config._attn_implementation == attention.DOCUMENT_ATTENTION
    batcher = Batcher(encoded, spec.micro_batch_size, spec.max_seq_len, spec.packing, spec.seed,
                      tokenizer.pad_token_id, document_offsets=per_document,
                      width_multiple=row_width_multiple(recipe.method, device))
    steps = total_steps(recipe, len(batcher))
    evaluation = make_evaluation(recipe, eval_encoded, steps, precision, device, fused, tokenizer.pad_token_id,
                                 per_document, world)
    optimizer = make_optimizer(recipe, trainable, device)
    scheduler = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=int(spec.warmup_ratio * steps),
                              num_training_steps=steps)
    scaler = torch.amp.GradScaler(device.type) if precision.loss_scaling else None
    state = _starting_state(recipe, out, resume, model, optimizer, scheduler, scaler, world)
    metrics_path, tracker = _open_logs(recipe, out, state.step, world)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    share = spec.gradient_accumulation  # micro-batches per rank and step; the step takes share × world size
    say(f"training: {steps} steps of {spec.gradient_accumulation}×{spec.micro_batch_size} rows "
        + (f"× {world.size} ranks " if world.distributed else "")
        + f"(≤{spec.max_seq_len} tokens each), {len(batcher)} micro-batches per epoch"
        + (f", eval every {evaluation.every} steps and after the last" if evaluation else ""))
    model.train()
    stream = _micro_batches(batcher, state)
    step_context = StepContext(optimizer, scheduler, scaler, trainable, spec.max_grad_norm, precision, device,
                               world.size)
    build_kernel_variants(trained, batcher, step_context, triton_kernels=fused)
    print_every = max(1, steps // 50)  # every step stays in metrics.jsonl; the terminal gets ~50 lines
    last_loss = float("nan")  # a resumed run that is already complete trains no step
    budget_clock, budget_stop = BudgetClock(read_budget(), started), None
    with metrics_path.open("a") as metrics_file, _sigterm_flag() as stop_requested:
        try:
            while state.step < steps:
                t0 = time.perf_counter()
                group = [next(stream) for _ in range(share * world.size)]
                mine = group[world.rank * share:(world.rank + 1) * share]
                try:
                    last_loss, n_items, grad_norm = train_step(trained, group, step_context, mine)
                except torch.cuda.OutOfMemoryError:
                    recomputed = _checkpoint_all_after_oom(recipe, model, optimizer, state.step + 1, recomputed,
                                                           layers, world)
                    step_context = step_context.for_a_redone_step()
                    last_loss, n_items, grad_norm = train_step(trained, group, step_context, mine)
                last_loss = distributed.summed(world, last_loss)
                _refuse_non_finite(last_loss, state.step + 1, out, step_context.scaler)
                row = _account_step(state, group, n_items, time.perf_counter() - t0, last_loss, grad_norm,
                                    scheduler.get_last_lr()[0], step_context.scaler)
                stop_early = evaluation is not None and evaluation.after_step(model, state, row, out)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                tracker.log(row)
                _report_step(row, steps, print_every)
                if stop_early:
                    say(evaluation.stop_note(state))
                    break
                # Every rank decides alike: a SIGTERM to any one of them, or one clock past the budget, stops all.
                stop, spent = distributed.any_of(world, stop_requested(), budget_clock.spent())
                if state.step < steps and spent:
                    budget_stop = budget_clock.stop_record(state.step, steps)
                    # so that `cloudtune run --resume` can train on from here with more budget
                    checkpoint.save(out, recipe, model, optimizer, scheduler, state, step_context.scaler, world)
                    break
                due = bool(spec.checkpoint_steps) and state.step % spec.checkpoint_steps == 0
                if state.step < steps and (due or stop):
                    saved = checkpoint.save(out, recipe, model, optimizer, scheduler, state, step_context.scaler,
                                            world)
                    if stop:
                        distributed.stopping(world)
                        raise Stopped(state.step, saved)
        finally:
            tracker.close()

    del trained, optimizer, scheduler, step_context, trainable, base  # FSDP: the shards' memory, for the copy
    if parallelism == "fsdp":
        model, base_samples = unsharded_copy(recipe, model, tokenizer, encoded.format, world, device, autocast)
    if not world.main:
        return {}  # rank 0 writes every output; with DDP its copy of the weights is everyone's
    evaluated = evaluation.finish(model, state, out) if evaluation else None
    summary = export.finish(recipe, model, tokenizer, out, device=device, encoded=encoded, state=state,
                            wall_seconds=time.time() - started,
                            epochs=state.epoch + state.batch_in_epoch / len(batcher), final_loss=last_loss,
                            checkpointed_layers=recomputed, fused_kernels=fused, trainable=n_trainable,
                            base_samples=base_samples, budget_stop=budget_stop, evaluation=evaluated,
                            world=world, parallelism=parallelism)
    say(f"done: {state.tokens} tokens in {state.train_seconds:.1f}s ({summary['tokens_per_s']:.0f} tok/s); "
        f"outputs in {out}")
    return summary


def _join(recipe: Recipe, out: Path, resume: bool) -> tuple[distributed.World, torch.device, bool]:
    """This process's place in the run, its device, and whether the run resumes; the checks before loading."""
    world = distributed.world_from_env()
    device = distributed.pick_device(world)
    distributed.join(world, device)  # before anything is loaded: a rank that cannot reach the others fails now
    quiet(not world.main)
    preflight(recipe, device)
    limit_memory(recipe, device)
    # rank 0's disk decides: on several machines only node 0 holds the checkpoints (broadcast on resume)
    resume = distributed.from_main(world, resume)
    if world.main and not resume and checkpoint.complete(out):
        raise CloudtuneError(f"{out} holds checkpoints of an earlier run.",
                             "Pass --resume to continue it, or train into another --out directory.")
    out.mkdir(parents=True, exist_ok=True)
    return world, device, resume


def _open_logs(recipe: Recipe, out: Path, step: int, world: distributed.World) -> tuple[Path, tracking.Tracker]:
    """metrics.jsonl (trimmed to where a resumed run goes on) and the tracker: rank 0's; the others log nothing."""
    if not world.main:
        return Path(os.devnull), tracking.Tracker()
    metrics_path = out / "metrics.jsonl"
    checkpoint.trim_metrics(metrics_path, step)
    return metrics_path, tracking.open_tracker(recipe, out, step)


def unsharded_copy(recipe: Recipe, model, tokenizer, fmt: str, world: distributed.World, device: torch.device,
                   autocast: bool) -> tuple:
    """After FSDP training: the trained weights gathered into a fresh, unsharded model on rank 0, for the
    outputs that need the whole model (adapter, samples, probe, merge), and the "before" samples of that
    fresh copy, taken before the weights go in; (None, []) on the other ranks."""
    weights = checkpoint.full_weights(model)  # every rank takes part
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not world.main:
        return None, []
    plain = model_lib.prepare_for_training(recipe, model_lib.load_base(recipe, device), 0, autocast=autocast)
    before = export.generate_samples(recipe, plain, tokenizer, fmt, device)
    checkpoint.load_weights(plain, weights)
    return plain, before


def encode_data(recipe: Recipe, tokenizer, world: distributed.World) -> tuple[Encoded, Encoded | None]:
    """The training rows and the eval rows (None without dataset.eval), tokenized and checked.

    Under torchrun rank 0 alone reads and tokenizes them and hands the result to the other ranks: a large
    dataset costs its CPU time and memory peak once, not once per GPU, and no rank can pack differently."""
    if not world.distributed:
        return _encode_rows(recipe, tokenizer)
    try:
        made = _encode_rows(recipe, tokenizer) if world.main else None
    except CloudtuneError as exc:  # a bad row stops every rank with rank 0's message, not rank 0 alone
        made = exc
    made = distributed.from_main(world, made)
    if isinstance(made, CloudtuneError):
        made.told_by_main = not world.main
        raise made
    return made


def _encode_rows(recipe: Recipe, tokenizer) -> tuple[Encoded, Encoded | None]:
    rows, held = split_eval(recipe, load_rows(recipe))
    encoded = encode(recipe, tokenizer, rows)
    for note in encoded.notes:
        say(f"note: {note}")
    say(f"data: {encoded.rows} rows, format {encoded.format}, {encoded.tokens:,} tokens per epoch, "
        f"{encoded.trained_tokens:,} of them trained (carry a loss)")
    if not held:
        return encoded, None
    eval_encoded = encode(recipe, tokenizer, held, fmt=encoded.format, part="eval")
    for note in eval_encoded.notes:
        say(f"note: eval: {note}")
    say(f"eval: {eval_encoded.rows} held-out rows, {eval_encoded.trained_tokens} tokens with a loss")
    return encoded, eval_encoded


def _refuse_non_finite(loss: float, step: int, out: Path, scaler) -> None:
    """A loss of NaN or inf means the weights are no longer worth saving: stop with the reason instead of
    training on and calling it success. Loss scaling (fp16) skips an overflowed step by itself."""
    if math.isfinite(loss) or scaler is not None:
        return
    saved = checkpoint.complete(out)
    kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before it"
    raise CloudtuneError(f"step {step}: the loss is {loss}: the training diverged, so nothing was saved from this "
                         f"step on ({kept}).",
                         "Lower training.learning_rate, raise warmup_ratio or set max_grad_norm, and check the "
                         "dataset for empty or broken rows.")


def _report_step(row: dict, steps: int, print_every: int) -> None:
    step = row["step"]
    evaluated = row.get("eval_loss") is not None
    if step % print_every == 0 or step in (1, steps) or evaluated:
        say(f"step {step}/{steps} loss {row['loss']:.4f} lr {row['lr']:.2e} tok/s {row['tokens_per_s']:.0f}"
            + (f" eval_loss {row['eval_loss']:.4f}" if evaluated else "")
            + (f" (best {row['best_eval_loss']:.4f} at step {row['best_step']})" if "best_eval_loss" in row else ""))


@dataclass
class BudgetClock:
    """The deadline max_cost sets (see cloudtune.remote.budget), counted from the trainer's start."""

    budget: Budget | None
    started: float

    def spent(self) -> bool:
        return self.budget is not None and time.time() - self.started >= self.budget.train_seconds

    def stop_record(self, step: int, steps: int) -> dict:
        """What run.json says of a run the budget stopped; the outputs so far are saved as usual."""
        budget = self.budget
        say(f"budget: max_cost ${budget.max_cost:.2f} at ${budget.price_per_hour:.2f}/h is spent after step "
            f"{step}/{steps}; saving the outputs so far")
        return {"max_cost": budget.max_cost, "price_per_hour": budget.price_per_hour, "stopped_at_step": step,
                "planned_steps": steps}


def _starting_state(recipe: Recipe, out: Path, resume: bool, model, optimizer, scheduler, scaler,
                    world: distributed.World) -> checkpoint.State:
    if not resume:
        return checkpoint.State()
    restored = checkpoint.restore_latest(out, recipe, model, optimizer, scheduler, scaler, world)
    say(f"resumed from step {restored.step}" if restored else "resume: no checkpoint yet, starting from step 0")
    return restored or checkpoint.State()


def _account_step(state: checkpoint.State, group, n_items: int, seconds: float, loss: float, grad_norm,
                  lr: float, scaler) -> dict:
    """Count a finished optimizer step into the run's state; returns its metrics.jsonl row."""
    step_tokens = sum(tokens for _, tokens in group)
    state.step += 1
    state.tokens += step_tokens
    state.trained_tokens += n_items
    state.train_seconds += seconds
    row = dict(step=state.step, loss=round(loss, 5), lr=lr, tokens=state.tokens, step_tokens=step_tokens,
               trained_tokens=n_items, tokens_per_s=round(step_tokens / seconds, 1), grad_norm=grad_norm,
               seconds=round(state.train_seconds, 3))
    if scaler is not None:  # overflowed steps were skipped and show grad_norm null
        row["loss_scale"] = scaler.get_scale()
    return row


@dataclass(frozen=True)
class StepContext:
    """What an optimizer step needs besides the model and its micro-batches."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None  # fp16 only: scales the loss so small gradients survive
    trainable: list
    max_grad_norm: float | None
    precision: model_lib.Precision
    device: torch.device
    world_size: int = 1

    def for_a_redone_step(self) -> StepContext:
        """A step that failed part-way may have unscaled its gradients already; the scaler refuses to
        do that twice before an update, so the redo gets a copy that has not seen this step."""
        if self.scaler is None:
            return self
        fresh = torch.amp.GradScaler(self.device.type)
        fresh.load_state_dict(self.scaler.state_dict())
        return replace(self, scaler=fresh)


def train_step(model, group: list, step: StepContext, share: list | None = None) -> tuple[float, int, float | None]:
    """One optimizer step over a group of micro-batches; returns (loss, trained tokens, grad norm).

    The loss is the mean over every trained token of the step, however they fall into micro-batches:
    each micro-batch's summed token loss is divided by the whole step's token count. Under fp16 loss
    scaling a step whose gradients overflowed is skipped (the scaler lowers its scale) and its grad
    norm is None.

    Under torchrun this rank runs only its `share` of the group and returns its part of the loss (the
    caller sums the ranks'). DDP and FSDP average the ranks' gradients, so each rank's loss is scaled
    by the world size: the step's gradient is then the one-process gradient over the whole group.
    """
    device, scaler, optimizer = step.device, step.scaler, step.optimizer
    share = group if share is None else share
    n_items = sum(int((batch["labels"][:, 1:] != IGNORE).sum()) for batch, _ in group)
    # Summed on the device and read once the step is done: reading each micro-batch's loss, or the grad
    # norm before the optimizer step, would make the host wait on the GPU and the GPU then wait on the host.
    loss_sum = torch.zeros((), device=device)
    for index, (batch, _tokens) in enumerate(share):
        batch = on_device(batch, device)
        with distributed.gradient_sync(model, index == len(share) - 1):
            with model_lib.mixed_precision(step.precision, device):
                loss = model(**batch, num_items_in_batch=max(n_items, 1)).loss
            scaled = loss * step.world_size if step.world_size > 1 else loss
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.detach().float()
    if scaler:
        scaler.unscale_(optimizer)  # clipping and the reported norm see the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(step.trainable, step.max_grad_norm) if step.max_grad_norm else None
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    step.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so the step's time is the GPU's, not just the launch queue's
    grad_norm = None if grad_norm is None else distributed.as_float(grad_norm)
    return loss_sum.item(), n_items, grad_norm if grad_norm is None or math.isfinite(grad_norm) else None


def build_kernel_variants(model, batcher: Batcher, step: StepContext, triton_kernels: bool) -> None:
    """Have Triton build every variant of the fused kernels before the first step, not in the middle.

    Triton builds a kernel once for each integer argument that is, or is not, a multiple of 16. The rows'
    widths always are (data.row_width_multiple), but Liger's cross-entropy takes the micro-batch's count
    of trained tokens, a multiple of 16 in one micro-batch of 16: that one paid 0.1-0.4 s of building
    whenever it came (bench/results/profile_step.jsonl), a one-off that the step times, the tok/s the
    log reports and the runs the cost model learns from all took for the method's pace. One small forward
    and backward of each kind (16 and 17 trained tokens) builds them; RNG, gradients and weights are
    left as they were.
    """
    if not triton_kernels:
        return
    width = 32  # a row width of the same kind as the training's (a multiple of 16), room for 17 labels
    rows = batcher.micro_batch_size  # as many rows as a step's micro-batch: the kernels take that count too
    for trained_tokens in (16, 17):
        labels = torch.full((rows, width), IGNORE, dtype=torch.long)
        labels[0, 1:trained_tokens + 1] = batcher.pad_id  # the loss reads labels from the second token on
        batch = {"input_ids": torch.full((rows, width), batcher.pad_id, dtype=torch.long), "labels": labels,
                 "position_ids": torch.arange(width).repeat(rows, 1)}
        if batcher.document_offsets:
            batch.update(document_fields(batch["position_ids"]))
        batch = on_device(batch, step.device)
        # gradients synced as in a step's last micro-batch: unsynced, FSDP2 would keep them unsharded and add
        # them into the first step's
        with torch.random.fork_rng(devices=[step.device] if step.device.type == "cuda" else []), \
                distributed.gradient_sync(model, True):
            with model_lib.mixed_precision(step.precision, step.device):
                loss = model(**batch, num_items_in_batch=trained_tokens).loss
            loss.backward()
    step.optimizer.zero_grad(set_to_none=True)  # as after every step


@contextmanager
def _sigterm_flag():
    """While training, SIGTERM asks for a checkpoint at the end of the current step instead of dying mid-write."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield lambda: False
        return
    def handler(signum, _frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: bool(received)
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:  # distributed.stopping may have set its own
            signal.signal(signal.SIGTERM, previous)


def _micro_batches(batcher: Batcher, state: checkpoint.State):
    """Endless stream over epochs that continues exactly where a resumed run stopped."""
    while True:
        for item in batcher.epoch(state.epoch, start=state.batch_in_epoch):
            state.batch_in_epoch += 1
            yield item
        state.epoch += 1
        state.batch_in_epoch = 0
