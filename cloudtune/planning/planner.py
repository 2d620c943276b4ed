"""The plan: every GPU offer that matches the recipe, whether the fine-tune fits on it, and what the
whole run would cost there; fitting offers first, cheapest first.

make_plan filters the offers (GPU, count, spot, clouds), works out each hardware once (`hardware_fit`:
how its GPUs share the work, memory fit and micro-batch, work, throughput), quotes each offer on it
(`estimate_offer`: overheads on its cloud, dollars at its price) and ranks them by dollars per run.
Every GPU of a machine trains (torchrun), on compute.num_nodes machines.
`cloudtune cost` shows the plan, `cloudtune run` picks from it and the SkyPilot backend turns the
fitting offers into its accelerator alternatives. Every figure is a low–high range rather than a
false point.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..clouds import OWN_CLUSTERS
from ..datasets import DatasetReport
from ..errors import CloudtuneError
from ..recipe import Recipe
from ..units import gib, gpus, hours_range, machines, money, money_range, percent_range, si, tokens_per_second
from .calibration import Scaling, scaling_efficiency
from .flops import StepConditions
from .gpus import SPECS, match_gpus, usable_gib
from .memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MemoryPeak,
    ModelShape,
    TrainSetup,
    checkpointing_note,
    choose_parallelism,
    first_fitting,
    memory_peak,
    required_bytes,
    sharded,
)
from .models import ModelInfo, resolve_model
from .offers import Offer, load_offers
from .overheads import Transfers, controller_cost, overhead_hours, transfers
from .throughput import gpu_tokens_per_second, train_seconds
from .work import Work, plan_work, processed_range


@dataclass
class Estimate:
    """What one recipe would cost on one offer, as a low–high range rather than a false point."""

    offer: Offer
    spot: bool
    fits: bool
    peak_gib: float  # predicted peak GPU memory per GPU
    micro_batch_size: int
    gradient_checkpointing: bool
    tokens: int  # tokens to train (dataset tokens × epochs, or steps × tokens per step)
    tokens_per_s_low: float
    tokens_per_s_high: float
    hours_low: float  # overheads included
    hours_high: float
    cost_low: float
    cost_high: float
    why: str = ""  # one line: what the estimate is made of
    checkpointed_layers: int = 0  # decoder layers recomputed in backward (gradient_checkpointing: any)
    # what the GPU must have free: the peak plus fragmentation and the CUDA context; when it does not
    # fit, at the smallest setting tried (micro-batch 1, every layer checkpointed), as `why` says
    needs_gib: float = 0.0
    nodes: int = 1  # machines of this offer in the run (compute.num_nodes)
    parallelism: str = "ddp"  # how the GPUs share the work: ddp (replicas) | fsdp (sharded)
    scaling_low: float = 1.0  # each GPU's throughput over what it reaches alone (calibration.Scaling)
    scaling_high: float = 1.0
    scaling_measured: bool = True  # False: the multi-GPU scaling is a prior, not a measurement

    @property
    def world_size(self) -> int:
        return self.offer.gpu_count * self.nodes

    @property
    def price_per_hour(self) -> float:
        """Every machine of the run together."""
        if self.spot and self.offer.spot_price_per_hour is not None:
            return self.offer.spot_price_per_hour * self.nodes
        return self.offer.price_per_hour * self.nodes

    @property
    def label(self) -> str:
        """What the run trains on, as every table and message writes it: A10G×1, H100×8, 2×H100×8."""
        return machines(self.offer.gpu, self.offer.gpu_count, self.nodes)

    def as_dict(self) -> dict:
        return {**asdict(self), "price_per_hour": self.price_per_hour, "world_size": self.world_size}


@dataclass
class Plan:
    tokens: int
    tokens_exact: bool
    snapshot_date: str
    estimates: list[Estimate] = field(default_factory=list)  # fitting first, then by high cost
    notes: list[str] = field(default_factory=list)  # what the user should know about this plan
    model_source: str = ""  # where the model's shape came from
    catalog: dict = field(default_factory=dict)  # price sources per cloud, cache use, unreadable clouds
    micro_batch_size: int = 0  # the recipe's, which an offer's estimate may have had to lower
    left_out: dict[str, str] = field(default_factory=dict)  # cloud -> why SkyPilot cannot run the plan there
    # False when the dataset's size is unknown (a hub dataset offline) and no max_steps says how long it
    # trains: the estimates then cover only provisioning, setup, downloads and teardown
    training_priced: bool = True

    @property
    def chosen(self) -> Estimate | None:
        return next((e for e in self.estimates if e.fits), None)

    @property
    def fastest(self) -> Estimate | None:
        """The fitting offer that ends soonest (the cheaper one at equal time)."""
        fitting = [e for e in self.estimates if e.fits]
        return min(fitting, key=lambda e: (e.hours_low + e.hours_high, e.cost_high), default=None)

    def candidates(self, limit: int = 8) -> list[Estimate]:
        """The fitting offers, cheapest run first: what a launcher may fall back through."""
        return [e for e in self.estimates if e.fits][:limit]

    def as_dict(self, limit: int | None = None) -> dict:
        return {"tokens": self.tokens, "tokens_exact": self.tokens_exact, "training_priced": self.training_priced,
                "snapshot_date": self.snapshot_date,
                "model_source": self.model_source, "notes": self.notes, "catalog": self.catalog,
                "left_out": self.left_out, "chosen": self.chosen.as_dict() if self.chosen else None,
                "fastest": self.fastest.as_dict() if self.fastest else None,
                "estimates": [e.as_dict() for e in self.estimates[:limit]]}


def choose_batch(recipe: Recipe, shape: ModelShape, setup: TrainSetup, row_tokens: int,
                 usable_bytes: float) -> tuple[int, int, MemoryPeak, bool]:
    """(micro-batch, checkpointed layers, memory, fits): the recipe's micro-batch with as few layers
    checkpointed as fit (the trainer's auto does the same on the machine), else a smaller micro-batch
    (the run keeps the effective batch by accumulating more)."""
    layers = shape.layers
    options = {"auto": range(layers + 1), "on": (layers,), "off": (0,)}[recipe.training.gradient_checkpointing]
    wanted = recipe.training.micro_batch_size
    # divisors only, so that accumulating more micro-batches keeps the effective batch exactly
    for mb in (d for d in range(wanted, 0, -1) if wanted % d == 0):
        def fits(recomputed: int, tokens: int = mb * row_tokens) -> bool:
            return required_bytes(memory_peak(shape, setup, tokens, recomputed)) <= usable_bytes

        recomputed = first_fitting(options, fits)
        if recomputed is not None:
            return mb, recomputed, memory_peak(shape, setup, mb * row_tokens, recomputed), True
    mb, recomputed = wanted, options[-1]
    return mb, recomputed, memory_peak(shape, setup, mb * row_tokens, recomputed), False


def precision_problem(recipe: Recipe, gpu: str) -> str | None:
    """Why the trainer would refuse this GPU, or None."""
    try:
        recipe.gpu_precision(gpu, SPECS[gpu].bf16, SPECS[gpu].fp8)
    except CloudtuneError as refused:
        return refused.message
    return None


@dataclass(frozen=True)
class HardwareFit:
    """How the recipe trains on `gpu_count` GPUs of one kind with this much usable memory each: the same
    for every offer of that hardware, whatever its cloud or price, so a plan works it out once per
    hardware (a catalog lists the same GPU and count dozens of times)."""

    world: int
    parallelism: str
    setup: TrainSetup
    micro_batch_size: int
    recomputed: int
    memory: MemoryPeak
    fits: bool
    work: Work
    scaling: Scaling
    trained_per_s: tuple[float, float]  # trained (not padded) tokens per second over every GPU, low and high
    train_hours: tuple[float, float]
    needs_gib: float
    why: str  # the training's part of Estimate.why: its speed, or why it does not fit
    moved: Transfers


@dataclass
class SharedWork:
    """What the hardware of one plan has in common, worked out once: plan_work by (micro-batch, world
    size), the transfers by setup."""

    works: dict[tuple[int, int], Work] = field(default_factory=dict)
    moved: dict[TrainSetup, Transfers] = field(default_factory=dict)


def hardware_fit(recipe: Recipe, report: DatasetReport, model: ModelInfo, gpu: str, gpu_count: int, usable: float,
                 shared: SharedWork | None = None) -> HardwareFit:
    shared = shared or SharedWork()

    def work_for(mb: int, world: int) -> Work:
        if (mb, world) not in shared.works:
            shared.works[mb, world] = plan_work(recipe, report, mb, world)
        return shared.works[mb, world]

    nodes = recipe.compute.num_nodes
    world = gpu_count * nodes
    base = work_for(recipe.training.micro_batch_size, world)
    alone = TrainSetup.from_recipe(recipe)
    parallelism = choose_parallelism(recipe.training.parallelism, model.shape, alone, world, usable, base.row_tokens,
                                     recipe.training.gradient_checkpointing, shardable=not recipe.fsdp_refusal)
    setup = sharded(alone, parallelism, world)
    mb, recomputed, memory, fits = choose_batch(recipe, model.shape, setup, base.row_tokens, usable)
    work = work_for(mb, world)
    step = StepConditions(model.shape, recipe.method, recomputed / model.shape.layers, work.span, mb * work.width,
                          setup.lora_targets if recipe.uses_lora else ())
    one_low, one_high = gpu_tokens_per_second(gpu, step, setup.impl.fused_loss)
    scaling = scaling_efficiency(parallelism, gpu_count, nodes, gpu=gpu, method=recipe.method)
    tps_low, tps_high = one_low * world * scaling.low, one_high * world * scaling.high
    checkpointing = checkpointing_note(recomputed, model.shape.layers)
    train_low, train_high = (seconds / 3600 for seconds in train_seconds(processed_range(work, step.passes),
                                                                              (tps_low, tps_high)))
    real = work.tokens / work.processed if work.processed else 1.0  # trained share of processed tokens
    trained_per_s = (tps_low * real, tps_high * real)
    if fits:
        why = (_speed_why(recipe, gpu, work, trained_per_s, mb, checkpointing) if work.tokens
               else "the training, not priced (the dataset's size is unknown),") + _sharing(parallelism, world, scaling)
        needs = required_bytes(memory) / GIB
    else:
        needs = required_bytes(memory_peak(model.shape, setup, base.row_tokens, recomputed)) / GIB
        how = f" with fsdp over {world} GPUs" if parallelism == "fsdp" and world > 1 else ""
        why = (f"needs {gib(needs)} per GPU{how} even at micro-batch 1 with checkpointing {checkpointing}; "
               f"{gpus(gpu, gpu_count)} has {gib(usable / GIB)} usable per GPU")
        if world > 1 and recipe.fsdp_refusal:
            why += f" (FSDP would share it out, but {recipe.fsdp_refusal})"
    refused = precision_problem(recipe, gpu)
    if refused:
        fits, why = False, refused
    if setup not in shared.moved:
        shared.moved[setup] = transfers(recipe, model, setup)
    return HardwareFit(world=world, parallelism=parallelism, setup=setup, micro_batch_size=mb, recomputed=recomputed,
                       memory=memory, fits=fits, work=work, scaling=scaling, trained_per_s=trained_per_s,
                       train_hours=(train_low, train_high), needs_gib=needs, why=why,
                       moved=shared.moved[setup])


def estimate_offer(recipe: Recipe, report: DatasetReport, model: ModelInfo, offer: Offer, spot: bool,
                   fit: HardwareFit | None = None) -> Estimate:
    """`fit`: hardware_fit for this offer's GPU, count and usable memory, when the caller has it already."""
    nodes = recipe.compute.num_nodes
    fit = fit or hardware_fit(recipe, report, model, offer.gpu, offer.gpu_count, _usable_bytes(recipe, offer))
    over_low, over_high, over_what = overhead_hours(recipe, model, fit.setup, offer.cloud, fit.moved)
    hours_low, hours_high = fit.train_hours[0] + over_low, fit.train_hours[1] + over_high
    spot = spot and offer.spot_price_per_hour is not None
    price = (offer.spot_price_per_hour if spot else offer.price_per_hour) * nodes
    why = fit.why if not fit.fits else f"{fit.why} + {hours_range(over_low, over_high)} {over_what}"
    cost_low, cost_high = hours_low * price, hours_high * price
    if spot:
        extra = controller_cost(hours_low, hours_high)
        cost_low, cost_high = cost_low + extra[0], cost_high + extra[1]
        why += f" + {money_range(*extra)} for SkyPilot's jobs controller VM"
    return Estimate(offer=offer, spot=spot, fits=fit.fits,
                    peak_gib=round(fit.memory.gib, 2), micro_batch_size=fit.micro_batch_size,
                    gradient_checkpointing=fit.recomputed > 0,
                    checkpointed_layers=fit.recomputed, needs_gib=round(fit.needs_gib, 2),
                    tokens=fit.work.tokens, tokens_per_s_low=round(fit.trained_per_s[0], 1),
                    tokens_per_s_high=round(fit.trained_per_s[1], 1), hours_low=round(hours_low, 3),
                    hours_high=round(hours_high, 3), cost_low=round(cost_low, 2),
                    cost_high=round(cost_high, 2), why=why, nodes=nodes, parallelism=fit.parallelism,
                    scaling_low=round(fit.scaling.low, 3), scaling_high=round(fit.scaling.high, 3),
                    scaling_measured=fit.scaling.measured)


def _sharing(parallelism: str, world: int, scaling: Scaling) -> str:
    """How several GPUs share the run, for `why`; nothing for one GPU."""
    if world <= 1:
        return ""
    return (f" on {world} GPUs by {parallelism} at {percent_range(scaling.low, scaling.high)} of one GPU's "
            f"speed each ({scaling.source})")


def _usable_bytes(recipe: Recipe, offer: Offer) -> float:
    usable = usable_gib(offer) * GIB
    if recipe.training.memory_limit_gib:  # the trainer caps its allocator there; the CUDA context comes on top
        usable = min(usable, recipe.training.memory_limit_gib * GIB + CUDA_CONTEXT_BYTES)
    return usable


def _speed_why(recipe: Recipe, gpu: str, work: Work, trained_per_s: tuple[float, float], mb: int,
               checkpointing: str) -> str:
    precision = "" if SPECS[gpu].bf16 else " in fp16 with loss scaling"
    return (f"{si(work.tokens)} tokens at {tokens_per_second(*trained_per_s)} "
            f"({recipe.method}{precision}, micro-batch {mb}, checkpointing {checkpointing})")


def make_plan(recipe: Recipe, report: DatasetReport, *, gpu: str | None = None, clouds: list[str] | None = None,
              spot: bool | None = None, offers: list[Offer] | None = None) -> Plan:
    """Every offer that matches the recipe's compute wishes, with fit and cost; fitting ones first, cheapest first."""
    model = resolve_model(recipe)
    gpu = gpu or recipe.compute.gpu
    clouds = clouds or recipe.compute.cloud or None
    spot = recipe.compute.spot if spot is None else spot
    notes: list[str] = []
    offers, snapshot, catalog_info = _read_offers(recipe, clouds, offers, notes)
    offers, left_out = runnable_offers(offers, catalog_info.get("unsupported", {}), spot, recipe.compute.num_nodes)
    notes += [f"{cloud} left out: {why}" for cloud, why in left_out.items()]
    candidates = _matching_offers(recipe, offers, gpu, clouds, spot, notes)
    if report.size_note:
        notes.append(report.size_note)
    work = plan_work(recipe, report)
    if work.note:
        notes.append(work.note)
    if work.evaluations and report.eval_tokens:
        notes.append(f"dataset.eval: {work.evaluations} evaluations of {report.eval_tokens:,} held-out tokens, "
                     "priced as forward passes (no gradients)")
    if not model.exact:
        notes.append(f"model shape {model.source}")
    shared = SharedWork()
    fits: dict[tuple[str, int, float], HardwareFit] = {}
    estimates = []
    for offer in candidates:
        key = (offer.gpu, offer.gpu_count, _usable_bytes(recipe, offer))
        if key not in fits:
            fits[key] = hardware_fit(recipe, report, model, *key, shared)
        estimates.append(estimate_offer(recipe, report, model, offer, spot, fits[key]))
    # at equal cost (a cluster of one's own costs $0 on every GPU), the faster run first
    estimates.sort(key=lambda e: (not e.fits, e.cost_high, e.cost_low, e.hours_high, e.offer.cloud,
                                  e.offer.instance_type))
    notes += scale_notes(recipe, estimates)
    line = fp8_note(recipe, report, model, estimates, spot)
    if line:
        notes.append(line)
    return Plan(tokens=work.tokens, tokens_exact=work.exact, snapshot_date=snapshot, estimates=estimates,
                notes=notes, model_source=model.source, catalog=catalog_info, left_out=left_out,
                micro_batch_size=recipe.training.micro_batch_size, training_priced=work.tokens > 0)


def scale_notes(recipe: Recipe, estimates: list[Estimate]) -> list[str]:
    """What a user should know when a plan trains on several GPUs: that their scaling is a prior, what
    max_steps means there, and what the fastest offer buys over the cheapest."""
    fitting = [e for e in estimates if e.fits]
    notes = []
    assumed = sorted({e.parallelism for e in fitting if not e.scaling_measured})
    if assumed:
        notes.append(f"several GPUs: scaling assumed, not measured ({', '.join(assumed)}; priors and their sources in "
                     "cloudtune/data/scaling.jsonl)")
    if recipe.training.max_steps and any(e.world_size > 1 for e in fitting):
        notes.append(f"training.max_steps {recipe.training.max_steps} on N GPUs trains N× the tokens of one GPU: each "
                     "step takes micro-batch × accumulation rows on every GPU")
    line = speed_note(fitting)
    if line:
        notes.append(line)
    return notes


def fp8_note(recipe: Recipe, report: DatasetReport, model: ModelInfo, estimates: list[Estimate],
             spot: bool) -> str | None:
    """'method fp8 would cost $3.10–4.20 on H100×1 (lambda) instead of $4.00–5.50 for lora': when the
    cheapest fitting offer whose GPU has FP8 would run the recipe for less with `method: fp8` (its base
    half the bytes of lora's, so it may fit without checkpointing where lora does not); None otherwise."""
    if not recipe.uses_lora or recipe.method == "fp8":
        return None
    current = next((e for e in estimates if e.fits and SPECS[e.offer.gpu].fp8), None)
    if current is None:
        return None
    as_fp8 = estimate_offer(recipe.model_copy(update={"method": "fp8"}), report, model, current.offer, spot)
    if not as_fp8.fits or as_fp8.cost_low + as_fp8.cost_high >= current.cost_low + current.cost_high:
        return None
    return (f"method fp8 would cost {money_range(as_fp8.cost_low, as_fp8.cost_high)} on {current.label} "
            f"({current.offer.cloud}) instead of {money_range(current.cost_low, current.cost_high)} for "
            f"{recipe.method}")


NOTABLY_FASTER = 1.1  # below, provisioning and setup dominate: more GPUs buy no time worth a line


def speed_note(fitting: list[Estimate]) -> str | None:
    """'fastest: H100×8 on lambda, 1h: 4.1× faster than the cheapest (A100-80GB×1 on runpod), +12 % dollars':
    the fastest fitting offer against the cheapest, at the middle of each range; None when the cheapest
    is also the fastest, or not notably slower."""
    if len(fitting) < 2:
        return None
    cheapest = fitting[0]
    fastest = min(fitting, key=lambda e: (e.hours_low + e.hours_high, e.cost_high))
    if fastest is cheapest:
        return None
    faster = (cheapest.hours_low + cheapest.hours_high) / (fastest.hours_low + fastest.hours_high)
    if faster < NOTABLY_FASTER:
        return None
    paid, cheap = fastest.cost_low + fastest.cost_high, cheapest.cost_low + cheapest.cost_high
    if cheap > 0 and paid >= 2 * cheap:
        more = f"{paid / cheap:.0f}× the dollars" if paid >= 10 * cheap else f"{paid / cheap:.1f}× the dollars"
    elif cheap > 0:
        more = f"{(paid / cheap - 1) * 100:+.0f} % dollars"
    else:
        more = f"{money((paid - cheap) / 2)} more" if paid > cheap else "the same dollars"
    return (f"fastest: {fastest.label} on {fastest.offer.cloud}, {hours_range(fastest.hours_low, fastest.hours_high)}: "
            f"{faster:.1f}× faster than the cheapest ({cheapest.label} on {cheapest.offer.cloud}), {more}")


# What a plan asks of SkyPilot on a cloud (sky.clouds.CloudImplementationFeatures names): every run
# trains in compute.image; a cluster tears itself down when idle; a spot run is a managed job on spot
# machines with its outputs on a mounted bucket; a run on several machines needs them as one cluster.
NEEDED_FEATURES = {False: ("DOCKER_IMAGE", "AUTODOWN"), True: ("DOCKER_IMAGE", "SPOT_INSTANCE", "STORAGE_MOUNTING")}
SEVERAL_MACHINES = "MULTI_NODE"


def runnable_offers(offers: list[Offer], unsupported: dict[str, dict[str, dict[str, str]]], spot: bool,
                    nodes: int = 1) -> tuple[list[Offer], dict[str, str]]:
    """The offers on clouds where SkyPilot can do all the plan needs, and why each other cloud is left
    out: one offer SkyPilot cannot run would fail the whole launch, not just fall through."""
    kind = "spot" if spot else "on-demand"
    needed = NEEDED_FEATURES[spot] + ((SEVERAL_MACHINES,) if nodes > 1 else ())
    left_out: dict[str, str] = {}
    for cloud in sorted({o.cloud for o in offers}):
        missing = unsupported.get(cloud, {}).get(kind, {})
        lacking = [f"{name.lower()} ({missing[name].rstrip('.')})" for name in needed if name in missing]
        if lacking:
            left_out[cloud] = f"SkyPilot cannot do {'; '.join(lacking)} there"
    runnable = [o for o in offers if o.cloud not in left_out]
    if offers and not runnable:
        raise CloudtuneError(f"SkyPilot cannot run this plan on {', '.join(left_out)}: "
                             + "; ".join(f"{cloud}: {why}" for cloud, why in left_out.items()) + ".",
                             f"Plan on other clouds (--cloud, compute.cloud){' or drop --spot' if spot else ''}.")
    return runnable, left_out


def _read_offers(recipe: Recipe, clouds: list[str] | None, offers: list[Offer] | None,
                 notes: list[str]) -> tuple[list[Offer], str, dict]:
    """(offers, their snapshot date, what the price catalog says of itself); `offers` given by a caller
    stand in for the catalog."""
    if offers is not None:
        if clouds:
            offers = [o for o in offers if o.cloud in {c.lower() for c in clouds}]
        return offers, "given offers", {}
    catalog = load_offers(clouds, recipe.compute.region)
    notes += catalog.problems
    info = {"prices": catalog.describe(), "sources": catalog.sources, "from_cache": catalog.from_cache,
            "problems": catalog.problems, "unsupported": catalog.unsupported}
    return catalog.offers, catalog.snapshot_date, info


def _matching_offers(recipe: Recipe, offers: list[Offer], gpu: str | None, clouds: list[str] | None,
                     spot: bool, notes: list[str]) -> list[Offer]:
    candidates = [o for o in offers if o.gpu in SPECS]
    if gpu:
        match = match_gpus(gpu)
        candidates = [o for o in candidates if o.gpu in match.names]
        if match.note:
            notes.append(match.note)
    count = recipe.compute.gpu_count
    if count is not None:
        candidates = [o for o in candidates if o.gpu_count == count]
    else:
        # a cluster of one's own lists every count at $0, and a count it lacks fails only at launch
        candidates = [o for o in candidates if o.cloud not in OWN_CLUSTERS or o.gpu_count == 1]
    if spot:
        candidates = [o for o in candidates if o.spot_price_per_hour is not None]
    if not candidates:
        wanted = " ".join(filter(None, [f"{count}×" if count else "", gpu or "any GPU", "spot" if spot else "",
                                        f"on {', '.join(clouds)}" if clouds else ""]))
        raise CloudtuneError(f"no offer in the price catalog matches {wanted}.",
                             "`cloudtune gpus` lists what there is; widen --gpu/--cloud, drop --spot, or "
                             "change compute.gpu_count.")
    return candidates


def fitted_recipe(recipe: Recipe, chosen: Estimate) -> tuple[Recipe, list[str]]:
    """A new recipe that trains with the micro-batch the plan found to fit, the effective batch kept,
    and what changed, for the CLI to print. `recipe` itself stays as it was.

    Checkpointing stays as the recipe says: with `auto` the trainer decides on the machine it lands
    on, from the same memory model.
    """
    spec = recipe.training
    if chosen.micro_batch_size >= spec.micro_batch_size:
        return recipe, []
    factor = spec.micro_batch_size // chosen.micro_batch_size
    training = type(spec).model_validate(spec.model_dump() | {
        "micro_batch_size": chosen.micro_batch_size, "gradient_accumulation": spec.gradient_accumulation * factor})
    fitted = recipe.model_copy(update={"training": training}, deep=True)
    return fitted, [f"micro-batch × accumulation {spec.micro_batch_size}×{spec.gradient_accumulation} → "
                    f"{training.micro_batch_size}×{training.gradient_accumulation} so it fits {chosen.offer.gpu}"]

