"""Rich rendering for the CLI: live run events, the receipt, run tables. No logic, only looks."""
from __future__ import annotations

import time

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .events import Events

STATUS_COLOURS = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}


class RichEvents(Events):
    def __init__(self, console: Console):
        self.console = console
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

    def _end_bar(self) -> None:
        # Any other event (or the transfer's end) closes the bar, so a failed transfer leaves no live display.
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(int(round(value)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def receipt_table(receipt: dict) -> Table:
    table = Table(title="receipt", show_header=False, title_justify="left", title_style="bold green")
    table.add_row("run", receipt["run_id"])
    table.add_row("backend", f"{receipt['backend']} ({receipt['machine']}, torn down)")
    table.add_row("device", str(receipt.get("device")))
    table.add_row("wall time", _seconds(receipt.get("wall_seconds")))
    table.add_row("train time", _seconds(receipt.get("train_seconds")))
    table.add_row("tokens trained", f"{receipt.get('tokens', 0):,} over {receipt.get('steps')} steps")
    table.add_row("tokens/s", f"{receipt.get('tokens_per_s', 0):,.0f}")
    table.add_row("final loss", f"{receipt.get('final_loss', float('nan')):.4f}")
    evaluation = receipt.get("eval")
    if evaluation:
        table.add_row("eval loss", eval_summary(evaluation, receipt.get("steps")))
    if receipt.get("peak_gpu_gib") is not None:
        table.add_row("peak GPU memory", f"{receipt['peak_gpu_gib']:.1f} GiB")
    estimate = receipt.get("estimate")
    if estimate:
        if estimate.get("est_hours_low") is not None:
            table.add_row("time: estimate / actual", f"{_hours(estimate['est_hours_low'], estimate['est_hours_high'])}"
                                                     f" / {_seconds(receipt.get('wall_seconds'))}")
        actual = receipt.get("actual_cost")
        estimated = (_dollars(estimate["est_cost_low"], estimate["est_cost_high"])
                     if estimate.get("est_cost_low") is not None else "-")
        table.add_row("cost: estimate / actual",
                      f"{estimated} / " + (f"${actual:,.2f}" if actual is not None else "-")
                      + (f" ({estimate['gpu']} at ${estimate['price_per_hour']:.2f}/h)" if estimate.get("gpu") else ""))
    stop = receipt.get("budget_stop")
    if stop:
        table.add_row("budget", f"max_cost ${stop['max_cost']:,.2f} spent: stopped after step "
                                f"{stop['stopped_at_step']} of {stop['planned_steps']}, outputs so far kept; to "
                                f"train on: cloudtune run --resume {receipt['run_id']} --max-cost USD")
    table.add_row("adapter" if receipt.get("weights_dir") == "adapter" else "model", receipt["weights_path"])
    table.add_row("outputs", receipt["output_dir"])
    if receipt.get("report"):
        table.add_row("report", receipt["report"])
    sample = receipt.get("sample")
    if sample:
        table.add_row("sample", f"{escape(sample['prompt'])}\n  before: {escape(sample['base'])}\n"
                                f"  after:  {escape(sample['tuned'])}")
    return table


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


def runs_table(runs: list[dict]) -> Table:
    table = Table(title="runs", title_justify="left")
    for column in ("run", "name", "backend", "status", "started", "wall", "est time", "tokens", "est $", "actual $",
                   "eval loss"):
        table.add_column(column)
    for run in runs:
        colour = STATUS_COLOURS.get(run["status"], "cyan")
        estimate = (f"{run['est_cost_low']:.2f}–{run['est_cost_high']:.2f}"
                    if run.get("est_cost_low") is not None else "-")
        actual = f"{run['actual_cost']:.2f}" if run.get("actual_cost") is not None else "-"
        status = run["status"] + (" (its CLI is gone)" if run.get("launcher_alive") is False else "")
        table.add_row(run["id"], run["name"], run["backend"], f"[{colour}]{status}[/]",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(run["created_at"])),
                      _seconds(run.get("wall_seconds")),
                      _hours(run["est_hours_low"], run["est_hours_high"]) if run.get("est_hours_low") is not None
                      else "-",
                      f"{run['tokens']:,}" if run.get("tokens") else "-",
                      estimate, actual, _eval_cell(run.get("meta") or {}))
    return table


def _eval_cell(meta: dict) -> str:
    return f"{meta['eval_loss']:.4f} @{meta['eval_step']}" if meta.get("eval_loss") is not None else "-"


# ----------------------------------------------------------------------------------------------
# Plans and offers


def _hours(low: float, high: float) -> str:
    if high < 1:
        return f"{low * 60:.0f}–{high * 60:.0f} min"
    return f"{low:.1f}–{high:.1f} h"


def _dollars(low: float, high: float) -> str:
    return f"${low:,.2f}–{high:,.2f}"


def cost_table(plan, title: str, top: int) -> Table:
    """The plan's offers, cheapest run first; the chosen (cheapest that fits) one highlighted."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    # figures never shrink; the offer's names fold onto a second line on a narrow terminal
    table.add_column("offer", overflow="fold", max_width=24)
    table.add_column("GPU", overflow="fold", min_width=6)
    for column, width in (("$/h", 4), ("est. time", 9), ("est. $ (run)", 11)):
        table.add_column(column, justify="right", no_wrap=True, min_width=width)
    table.add_column("fits (peak)", no_wrap=True, min_width=8)
    chosen = plan.chosen
    for estimate in plan.estimates[:top]:
        offer = estimate.offer
        if estimate.fits:
            fits = "[green]yes[/]" + (f" ckpt mb{estimate.micro_batch_size}" if estimate.gradient_checkpointing else "")
        else:
            fits = "[red]no[/]"
        style = "bold green" if estimate is chosen else ("dim" if not estimate.fits else None)
        price = f"{estimate.price_per_hour:.2f}" + (" spot" if estimate.spot else "")
        table.add_row(f"{offer.cloud} {escape(offer.region)} [dim]{escape(offer.instance_type)}[/]",
                      f"{offer.gpu}×{offer.gpu_count}", price, _hours(estimate.hours_low, estimate.hours_high),
                      _dollars(estimate.cost_low, estimate.cost_high), f"{fits} {estimate.peak_gib:.0f}G",
                      style=style)
    return table


def gpus_table(catalog, title: str, specs: dict) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("GPU", overflow="fold", min_width=6)
    table.add_column("memory", justify="right", no_wrap=True, min_width=6)
    table.add_column("TFLOP/s", justify="right", no_wrap=True, min_width=4)
    table.add_column("offer", overflow="fold", max_width=30)
    table.add_column("$/h", justify="right", no_wrap=True, min_width=5)
    table.add_column("spot $/h", justify="right", no_wrap=True, min_width=5)
    for offer in catalog.offers:
        spec = specs[offer.gpu]
        spot = f"{offer.spot_price_per_hour:.2f}" if offer.spot_price_per_hour is not None else "-"
        table.add_row(f"{offer.gpu}×{offer.gpu_count}", f"{offer.gpu_memory_gib:.0f} GiB",
                      f"{spec.tflops:g}" + ("" if spec.bf16 else " fp16"),
                      f"{offer.cloud} {escape(offer.region)} [dim]{escape(offer.instance_type)}[/]",
                      f"{offer.price_per_hour:.2f}", spot)
    return table


def launch_order_table(shown: dict, prices: str) -> Table:
    """A cloud run's offers in the order SkyPilot will try them: the chosen one, then the fallbacks;
    `prices` says where the prices come from and of when."""
    table = Table(title=f"launch order: cheapest run first, then fallbacks ({prices})",
                  title_justify="left")
    table.add_column("try", justify="right", no_wrap=True)
    table.add_column("offer", overflow="fold", max_width=34)
    table.add_column("GPU", no_wrap=True)
    for column in ("$/h", "est. hours", "est. $ per run"):
        table.add_column(column, justify="right", no_wrap=True)
    rows = ([shown["chosen"]] if shown["chosen"] else []) + shown["fallbacks"]
    for i, estimate in enumerate(rows, start=1):
        offer = estimate["offer"]
        table.add_row(str(i), f"{offer['cloud']} {escape(offer['region'])} [dim]{escape(offer['instance_type'])}[/]",
                      f"{offer['gpu']}×{offer['gpu_count']}", f"{estimate['price_per_hour']:.2f}",
                      f"{estimate['hours_low']:.2f}–{estimate['hours_high']:.2f}",
                      f"${estimate['cost_low']:.2f}–{estimate['cost_high']:.2f}",
                      style="bold green" if i == 1 else None)
    return table


def check_table(clouds: dict[str, dict]) -> Table:
    """`cloudtune check`: each cloud, enabled or what it is missing, and the pip extra with its libraries."""
    table = Table(title="clouds SkyPilot can rent on (`sky check`, run now)", title_justify="left")
    table.add_column("cloud", no_wrap=True)
    table.add_column("enabled", no_wrap=True)
    table.add_column("missing", overflow="fold")
    table.add_column("libraries", overflow="fold")
    for name, cloud in sorted(clouds.items(), key=lambda item: (not item[1]["enabled"], item[0])):
        table.add_row(name, "[green]yes[/]" if cloud["enabled"] else "[red]no[/]", escape(cloud["missing"] or ""),
                      escape(cloud["extra"] or ""), style=None if cloud["enabled"] else "dim")
    return table
