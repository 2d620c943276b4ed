"""Rich rendering for the CLI: live run events, the receipt, every table. No logic, only looks.

One table style (`grid`) and one way of writing key-value facts (`facts`) for every command; every
figure is written by `units`. Narrow terminals get fewer columns, never cut ones:
what a user copies (run ids, paths, commands) is printed whole, and long paths go on lines of their own.
"""
from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Column, Table
from rich.text import Text

from . import units
from .events import Events
from .receipt import scale, scale_rows

SPINNER_AFTER_S = 1.0  # quicker work shows no spinner: one that flashes for a blink is only noise
STATUS_COLOURS = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}


@contextmanager
def spinner(what: str, console: Console | None = None, after: float = SPINNER_AFTER_S) -> Iterator[None]:
    """A spinner saying what is under way once the work has taken `after` seconds, on stderr and only on a
    terminal: a pipe, a log file or `--json` read by a program gets nothing."""
    console = console or Console(stderr=True, highlight=False, emoji=False)
    if not console.is_terminal:
        yield
        return
    status = console.status(escape(what))
    lock = threading.Lock()
    state = {"done": False, "shown": False}

    def show() -> None:
        with lock:
            if not state["done"]:
                status.start()
                state["shown"] = True

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
            if state["shown"]:
                status.stop()


class RichEvents(Events):
    def __init__(self, console: Console, status_console: Console | None = None):
        self.console = console
        self.status_console = status_console  # where spinners go: stderr (render.spinner's default)
        self._bar: Progress | None = None
        self._bar_task = None
        self._bar_label = ""

    def phase(self, name: str, detail: str = "") -> None:
        self._end_bar()
        self.console.print(f"[bold cyan]▸ {name}[/] {escape(detail)}")

    def note(self, message: str) -> None:
        self._end_bar()
        self.console.print(f"  [dim]{escape(message)}[/]")

    def log(self, line: str) -> None:
        self._end_bar()
        self.console.print(f"  [dim]│[/] {escape(line)}")

    def warn(self, message: str) -> None:
        self._end_bar()
        self.console.print(f"[bold yellow]! {escape(message)}[/]")

    def progress(self, label: str, done: int, total: int) -> None:
        if self._bar is not None and label != self._bar_label:
            self._end_bar()
        if self._bar is None:
            self._bar = Progress(TextColumn("  {task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self._bar_task = self._bar.add_task(label, total=total)
            self._bar_label = label
            self._bar.start()
        self._bar.update(self._bar_task, completed=done, total=total)
        if done >= total:
            self._end_bar()

    def busy(self, what: str):
        return spinner(what, self.status_console)

    def _end_bar(self) -> None:
        # Any other event (or the transfer's end) closes the bar, so a failed transfer leaves no live display.
        if self._bar is not None:
            self._bar.stop()
            self._bar = None



# ----------------------------------------------------------------------------------------------
# The pieces every command is printed with


def text(header: str) -> Column:
    """Words that may wrap between words (a word longer than the column folds rather than vanish)."""
    return Column(header, overflow="fold")


def figure(header: str) -> Column:
    return Column(header, justify="right", no_wrap=True)


def whole(header: str) -> Column:
    """Something a user copies (a run id, a GPU name): never wrapped, never cut."""
    return Column(header, no_wrap=True)


def grid(*columns: Column) -> Table:
    """The one table style."""
    return Table(*columns, box=box.SIMPLE_HEAD, header_style="bold", padding=(0, 1, 0, 0), pad_edge=False,
                 show_edge=False)


def widest_that_fits(width: int, *tables: Table) -> Table:
    """The first of `tables` (the most columns first) that shows every value of its unwrapped columns,
    and every word of the others, whole in `width` columns; the last one (the fewest columns) otherwise."""
    for table in tables[:-1]:
        probe = Console(width=width, file=io.StringIO(), record=True, color_system=None, emoji=False)
        probe.print(table)
        shown = probe.export_text()
        cells = [line for column in table.columns if column.no_wrap for cell in [column.header, *column.cells]
                 for line in Text.from_markup(str(cell)).plain.split("\n")]  # a cell's lines are shown apart
        words = [word for column in table.columns if not column.no_wrap
                 for cell in [column.header, *column.cells] for word in Text.from_markup(str(cell)).plain.split()]
        if all(piece in shown for piece in cells + words):
            return table
    return tables[-1]


def facts(console: Console, title: str | None, rows: list[tuple[str, str]]) -> None:
    """Key-value facts as aligned lines. Values are never cut: a long one (a path) runs on, as the
    terminal wraps it, so that it can be copied whole."""
    if title:
        console.print(f"[bold]{escape(title)}[/]")
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        console.print(f"  [dim]{escape(key.ljust(width))}[/]  {escape(value)}", soft_wrap=True)


def indented(message: str, style: str = "dim") -> Padding:
    """A paragraph whose wrapped lines keep its indent."""
    return Padding(f"[{style}]{escape(message)}[/]", (0, 0, 0, 2))


# ----------------------------------------------------------------------------------------------
# Runs


def receipt(console: Console, made: dict) -> None:
    rows = [("run", made["run_id"]), ("backend", f"{made['backend']} ({made['machine']}, torn down)"),
            ("device", str(made.get("device"))),
            ("wall time", units.duration(made.get("wall_seconds"))),
            ("train time", units.duration(made.get("train_seconds"))),
            ("tokens trained", f"{units.count(made.get('tokens', 0))} over {made.get('steps')} steps"),
            *scale_rows(made),
            ("final loss", f"{made.get('final_loss', float('nan')):.4f}")]
    if made.get("eval"):
        rows.append(("eval loss", eval_summary(made["eval"], made.get("steps"))))
    if made.get("peak_gpu_gib") is not None:
        rows.append(("peak GPU memory", units.gib(made["peak_gpu_gib"])))
    rows += _estimate_rows(made)
    stop = made.get("budget_stop")
    if stop:
        rows.append(("budget", f"max_cost {units.money(stop['max_cost'])} spent: stopped after step "
                               f"{stop['stopped_at_step']} of {stop['planned_steps']}, outputs so far kept; to "
                               f"train on: cloudtune run --resume {made['run_id']} --max-cost USD"))
    rows += [("adapter" if made.get("weights_dir") == "adapter" else "model", made["weights_path"]),
             ("outputs", made["output_dir"])]
    if made.get("report"):
        rows.append(("report", made["report"]))
    facts(console, "receipt", rows)
    sample = made.get("sample")
    if sample:
        console.print(indented(f"sample: {sample['prompt']}\n  before: {sample['base']}\n  after:  {sample['tuned']}",
                               style="none"))


def _estimate_rows(made: dict) -> list[tuple[str, str]]:
    estimate = made.get("estimate")
    if not estimate:
        return []
    rows = []
    if estimate.get("est_hours_low") is not None:
        planned = units.hours_range(estimate["est_hours_low"], estimate["est_hours_high"])
        rows.append(("time: estimate / actual", f"{planned} / {units.duration(made.get('wall_seconds'))}"))
    priced = f" ({estimate['gpu']} at {units.per_hour(estimate['price_per_hour'])})" if estimate.get("gpu") else ""
    planned = units.money_range(estimate.get("est_cost_low"), estimate.get("est_cost_high"))
    rows.append(("cost: estimate / actual", f"{planned} / {units.money(made.get('actual_cost'))}{priced}"))
    return rows


def eval_summary(evaluation: dict, steps: int | None) -> str:
    """The eval loss in one line: the best and where, the last, what was kept and whether it stopped early."""
    if evaluation.get("best_loss") is None:
        return "no evaluation ran"
    text = (f"{evaluation['best_loss']:.4f} best at step {evaluation['best_step']}, {evaluation['loss']:.4f} last "
            f"({evaluation['evaluations']} evaluations of {evaluation['rows']} rows)")
    if evaluation.get("stopped_early"):
        text += f"; stopped early after step {steps}"
    if evaluation.get("kept") == "best":
        text += f"; weights of step {evaluation['kept_step']} kept"
    return text


def runs_table(runs: list[dict], width: int) -> Table:
    """`cloudtune status`: the run id whole in every width, and its GPUs and tokens/s; backend, tokens
    and estimates when wide."""
    return widest_that_fits(width, *(_runs_table(runs, level) for level in (2, 1, 0, -1)))


def _runs_table(runs: list[dict], level: int) -> Table:
    """Level 0: the name goes under the run id, so that both stay whole, with the GPUs and tokens/s;
    1 adds a column for the name, wall time and tokens; 2 the backend and the estimate. -1, for names
    too long for anything else: no GPUs and tokens/s (`status --json` has them). The GPUs column only
    when some run trained on several (else it would say 1 on every row)."""
    several = any(scale(run.get("meta") or {})["world_size"] > 1 for run in runs)
    columns = [whole("run"), text("name")] if level > 0 else [whole("run / name")]
    columns += [text("backend")] if level > 1 else []
    columns += [text("status"), whole("started")]
    columns += ([figure("GPUs")] if several else []) + [figure("tok/s")] if level >= 0 else []
    columns += [figure("wall"), figure("tokens")] if level > 0 else []
    columns += [figure("est. $")] if level > 1 else []
    table = grid(*columns, figure("$"))
    for run in runs:
        colour = STATUS_COLOURS.get(run["status"], "cyan")
        status = run["status"] + (" (its CLI is gone)" if run.get("launcher_alive") is False else "")
        name = escape(run["name"])
        cells = [run["id"], name] if level > 0 else [f"{run['id']}\n[dim]{name}[/]"]
        cells += [run["backend"]] if level > 1 else []
        cells += [f"[{colour}]{status}[/]", time.strftime("%m-%d %H:%M", time.localtime(run["created_at"]))]
        cells += _run_scale(run)[0 if several else 1:] if level >= 0 else []
        if level > 0:
            cells += [units.duration(run.get("wall_seconds")), units.count(run.get("tokens"))]
        if level > 1:
            cells += [units.money_range(run.get("est_cost_low"), run.get("est_cost_high"))]
        table.add_row(*cells, units.money(run.get("actual_cost")))
    return table


def _run_scale(run: dict) -> list[str]:
    """The GPUs and tokens/s cells of a ledger row; '-' until the run has reported them."""
    trained = scale(run.get("meta") or {})
    if trained["tokens_per_s"] is None:
        return ["-", "-"]
    speed = units.si(trained["tokens_per_s"])
    if trained["world_size"] > 1:
        speed += f"\n[dim]{units.si(trained['tokens_per_s_per_gpu'])}/GPU[/]"
    return [units.world(trained["world_size"], trained["nodes"]), speed]


# ----------------------------------------------------------------------------------------------
# Plans and offers


def offer_where(offer) -> str:
    return f"{offer.cloud} ({offer.region}; {offer.instance_type})"


FITS_NOTE = ("* fits only with gradient checkpointing or a smaller micro-batch (the line under the table says "
             "which for the cheapest)")


def cost_table(plan, top: int, width: int, off: frozenset[str] = frozenset()) -> Table:
    """The plan's offers, cheapest run first; the chosen (cheapest that fits) one highlighted; region
    and instance type where they fit; clouds in `off` (not enabled here) marked †."""
    return widest_that_fits(width, _cost_table(plan, top, wide=True, off=off),
                            _cost_table(plan, top, wide=False, off=off))


def cloud_cell(cloud: str, off: frozenset[str]) -> str:
    return f"{cloud}†" if cloud in off else cloud


def _cost_table(plan, top: int, wide: bool, off: frozenset[str] = frozenset()) -> Table:
    """GPU is the run's: per machine, and `2×` in front for two machines; `needs` is per GPU."""
    spot = any(e.spot for e in plan.estimates)
    shown = plan.estimates[:top]
    several = any(e.world_size > 1 for e in shown)
    columns = [whole("GPU"), whole("cloud")] + ([whole("region"), whole("instance")] if wide else [])
    columns += [whole("split")] if wide and several else []
    table = grid(*columns, figure("spot $/h" if spot else "$/h"), figure("time"), figure("$ per run"),
                 figure("needs"), whole("fits"))
    chosen = plan.chosen
    for estimate in shown:
        offer = estimate.offer
        adjusted = estimate.gradient_checkpointing or estimate.micro_batch_size != plan.micro_batch_size
        fits = ("[green]yes[/]" + ("*" if adjusted else "")) if estimate.fits else "[red]no[/]"
        style = "bold green" if estimate is chosen else ("dim" if not estimate.fits else None)
        where = [escape(offer.region), escape(offer.instance_type)] if wide else []
        if wide and several:
            where.append(estimate.parallelism if estimate.world_size > 1 else "-")
        table.add_row(estimate.label, cloud_cell(offer.cloud, off), *where,
                      units.money(estimate.price_per_hour), units.hours_range(estimate.hours_low, estimate.hours_high),
                      units.money_range(estimate.cost_low, estimate.cost_high) + ("" if plan.training_priced else "+?"),
                      units.gib(estimate.needs_gib), fits, style=style)
    return table


def cost_footer(console: Console, plan, top: int) -> None:
    """Under the cost table: the legend when needed, the chosen offer in full, what was left out."""
    shown = plan.estimates[:top]
    if any(e.fits and (e.gradient_checkpointing or e.micro_batch_size != plan.micro_batch_size) for e in shown):
        console.print(f"[dim]{escape(FITS_NOTE)}[/]")
    chosen = plan.chosen
    if chosen:
        offer = chosen.offer
        whole = "for the whole run" if plan.training_priced else \
            "[bold yellow]before training, which is not priced (+?): the dataset's size is unknown[/]"
        console.print(f"[bold green]cheapest that fits:[/] {chosen.label} on "
                      f"{escape(offer_where(offer))}: {units.money_range(chosen.cost_low, chosen.cost_high)} {whole}")
        console.print(indented(chosen.why))
    else:
        console.print(f"[bold red]no offer fits:[/] {escape(plan.estimates[0].why)}")
    hidden = len(plan.estimates) - len(shown)
    if hidden > 0:
        misfits = sum(not e.fits for e in plan.estimates)
        console.print(f"[dim]{hidden} more offer(s) not shown; --top {len(plan.estimates)} shows all. "
                      f"{misfits} of {len(plan.estimates)} do not fit.[/]")


def gpus_table(offers: list, specs: dict, width: int, off: frozenset[str] = frozenset()) -> Table:
    return widest_that_fits(width, _gpus_table(offers, specs, wide=True, off=off),
                            _gpus_table(offers, specs, wide=False, off=off))


def _gpus_table(offers: list, specs: dict, wide: bool, off: frozenset[str] = frozenset()) -> Table:
    columns = [whole("GPU"), figure("memory"), figure("TFLOP/s"), whole("cloud")]
    columns += [whole("region"), whole("instance")] if wide else []
    table = grid(*columns, figure("$/h"), figure("spot $/h"))
    for offer in offers:
        spec = specs[offer.gpu]
        where = [escape(offer.region), escape(offer.instance_type)] if wide else []
        table.add_row(units.gpus(offer.gpu, offer.gpu_count), units.gib(offer.gpu_memory_gib),
                      f"{spec.tflops:g}" + ("" if spec.bf16 else " fp16"), cloud_cell(offer.cloud, off), *where,
                      units.money(offer.price_per_hour), units.money(offer.spot_price_per_hour))
    return table


def refresh_report(console: Console, refreshed: list, snapshot_date: str) -> None:
    """What `gpus --refresh` did, cloud by cloud."""
    if refreshed and all(r.message == "no network" for r in refreshed):
        console.print("[yellow]no network: SkyPilot's catalog repository cannot be reached; "
                      f"showing the prices of {snapshot_date}[/]")
    for result in refreshed:
        if result.message != "no network":
            colour = "green" if result.ok else "red"
            console.print(f"[{colour}]{result.cloud}: {'refreshed' if result.ok else 'not refreshed'}[/] "
                          f"({escape(result.message)})")


def gpus_footer(console: Console, found, top: int, filtered: bool) -> None:
    """Under the offers: how many were left out and how to see them; the GPUs never planned on, when
    the list was not narrowed to one GPU anyway."""
    catalog = found.catalog
    hidden = len(catalog.offers) - top
    if hidden > 0:
        console.print(f"[dim]{hidden} more offer(s) not shown; --top {len(catalog.offers)} shows all, "
                      "--gpu NAME or --cloud C narrows the list.[/]")
    if found.note:
        console.print(f"[yellow]note:[/] {escape(found.note)}")
    for problem in catalog.problems:
        console.print(f"[red]{escape(problem)}[/]")
    if catalog.skipped and not filtered:
        console.print(indented("not planned on: " + "; ".join(f"{name} ({why})" for name, why in
                                                               sorted(catalog.skipped.items()))))


def launch_order_table(shown: dict, width: int, off: frozenset[str] = frozenset()) -> Table:
    """A cloud run's offers in the order SkyPilot will try them: the chosen one, then the fallbacks."""
    return widest_that_fits(width, _launch_order_table(shown, wide=True, off=off),
                            _launch_order_table(shown, wide=False, off=off))


def _launch_order_table(shown: dict, wide: bool, off: frozenset[str] = frozenset()) -> Table:
    columns = [figure("try"), whole("GPU"), whole("cloud")] + ([whole("region"), whole("instance")] if wide else [])
    table = grid(*columns, figure("$/h"), figure("time"), figure("$ per run"))
    rows = ([shown["chosen"]] if shown["chosen"] else []) + shown["fallbacks"]
    for i, estimate in enumerate(rows, start=1):
        offer = estimate["offer"]
        where = [escape(offer["region"]), escape(offer["instance_type"])] if wide else []
        table.add_row(str(i), units.machines(offer["gpu"], offer["gpu_count"], estimate.get("nodes", 1)),
                      cloud_cell(offer["cloud"], off), *where,
                      units.money(estimate["price_per_hour"]),
                      units.hours_range(estimate["hours_low"], estimate["hours_high"]),
                      units.money_range(estimate["cost_low"], estimate["cost_high"]),
                      style="bold green" if i == 1 else None)
    return table


def check_table(clouds: dict[str, dict]) -> Table:
    """`cloudtune check`: each cloud, enabled or what it is missing, and the pip extra with its libraries."""
    table = grid(whole("cloud"), whole("enabled"), text("missing"), text("libraries"))
    for name, cloud in sorted(clouds.items(), key=lambda item: (not item[1]["enabled"], item[0])):
        table.add_row(name, "[green]yes[/]" if cloud["enabled"] else "[red]no[/]", escape(cloud["missing"] or ""),
                      escape(cloud["extra"] or ""), style=None if cloud["enabled"] else "dim")
    return table


# ----------------------------------------------------------------------------------------------
# Terminals that cannot show Unicode


ASCII = str.maketrans({"×": "x", "–": "-", "—": "-", "…": "...", "▸": ">", "│": "|", "·": "-", "≥": ">=",
                       "≤": "<=", "→": "->", "’": "'", "‘": "'", "“": '"', "”": '"', "≈": "~", "±": "+/-",
                       "†": "+"})


class AsciiText(io.TextIOBase):
    """A text stream for a terminal whose encoding has no `×` (PYTHONIOENCODING=ascii, a C locale):
    our own symbols become their ASCII look-alikes, anything else a `?`, instead of a crash."""

    def __init__(self, stream):
        self.stream = stream

    @property
    def encoding(self) -> str:  # rich reads it: an ASCII one draws its tables with ASCII lines
        return self.stream.encoding

    def write(self, text: str) -> int:
        encoding = self.stream.encoding or "ascii"
        self.stream.write(text.translate(ASCII).encode(encoding, "replace").decode(encoding))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def degrade_to_ascii() -> None:
    """Wrap stdout and stderr where they cannot encode the symbols cloudtune prints."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            "×–…".encode(stream.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            setattr(sys, name, AsciiText(stream))
