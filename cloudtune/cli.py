"""The `cloudtune` command: parse arguments, call one function of the core, render what it returns.

Heavy libraries (torch, transformers, sky, paramiko) are never imported at module level, so
`cloudtune --help` answers at once.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .backends import registry
from .errors import CloudtuneError
from .secrets import redact

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

class CloudtuneGroup(click.Group):
    """Turns user mistakes into one red paragraph and exit 2; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CloudtuneError as exc:
            if ctx.params.get("debug"):
                sys.stderr.write(redact(traceback.format_exc()))
            # Messages quote user data (column names, paths, a training's log): the one redaction rule
            # applies here, so no command can echo a secret. soft_wrap keeps paths whole for copy-paste.
            err_console.print(f"[bold red]error:[/] {escape(redact(exc.message))}", soft_wrap=True)
            if exc.hint:
                err_console.print(f"[yellow]hint:[/] {escape(redact(exc.hint))}", soft_wrap=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            err_console.print(f"[yellow]interrupted ({signal.Signals(signum).name})[/]")
            ctx.exit(128 + signum)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")


@click.group(cls=CloudtuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="cloudtune")
def cli(debug: bool) -> None:
    """Fine-tune an LLM on the cheapest GPU that fits, for a price known before you pay it."""
    from .lifecycle import sweep_dead_runs

    sweep_dead_runs()  # a run killed with its CLI left its secrets file behind: gone before anything else


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# init / validate


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default="recipe.yaml")
@click.option("--template", "-t", default="demo-tiny", show_default=True,
              help="Which ready recipe to start from (see --list).")
@click.option("--list", "list_only", is_flag=True, help="List the templates and exit.")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path: Path, template: str, list_only: bool, force: bool) -> None:
    """Write a commented recipe to PATH from a ready template."""
    from . import templates

    if list_only:
        for name, summary in templates.summaries().items():
            console.print(f"[bold]{name}[/]  {escape(summary)}")
        return
    written = templates.write(path, template, force)
    copied = f" (+ {', '.join(written.copied)})" if written.copied else ""
    console.print(f"wrote [bold]{path}[/] from template {template}{copied}")
    console.print(f"next: [bold]cloudtune validate {path}[/], then [bold]cloudtune cost {path}[/] "
                  f"or [bold]{escape(written.run_command)}[/]")


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@json_option
def validate(recipe_path: Path, as_json: bool) -> None:
    """Check a recipe and its dataset; count rows and tokens."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .datasets import inspect_dataset
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    with Progress(SpinnerColumn(), TextColumn("counting rows and tokens: {task.completed:,} rows"),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("count", total=None)
        report = inspect_dataset(recipe, progress=lambda n: progress.update(task, completed=n))
    if as_json:
        _print_json({"recipe": str(recipe_path), "fingerprint": recipe.fingerprint(), "dataset": report.as_dict()})
        return
    table = Table(title=f"{recipe_path}: valid", show_header=False, title_justify="left")
    table.add_row("model", recipe.model.name or f"init: {recipe.model.init}")
    table.add_row("method", recipe.method + (f" (r={recipe.lora.r}, targets {recipe.lora.target_modules})"
                                             if recipe.uses_lora else ""))
    table.add_row("dataset", f"{report.source} ({report.format})")
    table.add_row("rows", f"{report.rows:,}")
    exactness = "exact" if report.tokens_exact else "estimated"
    table.add_row("tokens", f"{report.tokens:,} per epoch ({exactness}; tokenizer: {report.tokenizer})")
    if report.truncated_rows:
        table.add_row("truncated", f"{report.truncated_rows:,} rows longer than max_seq_len "
                                   f"{recipe.training.max_seq_len} (longest {report.longest_row_tokens:,})")
    if report.eval_rows:
        table.add_row("eval", f"{report.eval_rows:,} rows, {report.eval_tokens:,} tokens ({report.eval_source})")
    console.print(table)


# ----------------------------------------------------------------------------------------------
# run / status / logs / down


@cli.command(cls=registry.BackendFlagsCommand)
@click.argument("recipe_path", metavar="RECIPE", required=False, type=click.Path(path_type=Path))
@click.option("--backend", "-b", default=registry.DEFAULT_BACKEND, show_default=True, envvar="CLOUDTUNE_BACKEND",
              help=registry.backend_help())
@click.option("--gpu", help="GPU to rent (A10, A100-80GB, H100, ...); overrides compute.gpu.")
@click.option("--cloud", "clouds", multiple=True,
              help="Only these clouds (repeat for several); overrides compute.cloud.")
@click.option("--spot/--on-demand", default=None,
              help="Spot machines, run as a managed job that resumes after preemption; overrides compute.spot.")
@click.option("--max-cost", type=click.FloatRange(min=0, min_open=True), metavar="USD",
              help="Refuse to start when the plan's high estimate exceeds this; overrides compute.max_cost.")
@click.option("--dry-run", is_flag=True, help="Show the plan, the offers in launch order and the SkyPilot task; "
                                              "rent nothing.")
@click.option("--resume", "resume_ref", metavar="RUN",
              help="Continue RUN (an id, a prefix, or 'last') from the checkpoint it kept when it stopped, on a new "
                   "machine; RECIPE defaults to RUN's recipe, --backend to RUN's backend.")
@json_option
def run(recipe_path: Path | None, backend: str, gpu: str | None, clouds: tuple[str, ...], spot: bool | None,
        max_cost: float | None, dry_run: bool, resume_ref: str | None, as_json: bool, **backend_flags) -> None:
    """Train RECIPE end to end: rent, sync, train, stream logs, pull outputs, tear down."""
    from . import lifecycle
    from .recipe import load_recipe, with_compute_overrides
    from .render import RichEvents, receipt_table

    continues = lifecycle.continuation(resume_ref) if resume_ref else None
    if continues is not None:
        recipe_path = recipe_path or (Path(continues.recipe_path) if continues.recipe_path else None)
        if click.get_current_context().get_parameter_source("backend") == click.core.ParameterSource.DEFAULT:
            backend = continues.backend
    if recipe_path is None:
        raise click.UsageError("Missing argument 'RECIPE'" + (" (the run to resume has no recipe file on record)"
                                                             if continues is not None else "") + ".")
    recipe = with_compute_overrides(load_recipe(recipe_path), gpu=gpu, cloud=list(clouds) or None, spot=spot,
                                    max_cost=max_cost)
    events = RichEvents(err_console if as_json else console)
    chosen = registry.create(backend, backend_flags, events, launching=not dry_run)
    if dry_run:
        _show_dry_run(lifecycle.preview(recipe, chosen, events, continues), as_json)
        return
    result = lifecycle.run(recipe, chosen, events, continues=continues)
    if as_json:
        _print_json(result.receipt)
    else:
        console.print(receipt_table(result.receipt))


@cli.command()
@click.option("--limit", default=20, show_default=True, help="How many recent runs to show.")
@json_option
def status(limit: int, as_json: bool) -> None:
    """Recent runs from the ledger, newest first."""
    from .lifecycle import recent_runs
    from .render import runs_table

    runs = recent_runs(limit)
    if as_json:
        _print_json(runs)
    elif not runs:
        console.print("no runs yet: try [bold]cloudtune init[/] then [bold]cloudtune run recipe.yaml[/]")
    else:
        console.print(runs_table(runs))


@cli.command()
@click.argument("run_ref", metavar="RUN", default="last")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the training ends.")
def logs(run_ref: str, follow: bool) -> None:
    """Print a run's training log (RUN is an id, a prefix of one, or 'last')."""
    from .lifecycle import training_log

    for line in training_log(run_ref, follow=follow):
        click.echo(line)


@cli.command()
@click.argument("run_ref", metavar="RUN", required=False)
@click.option("--dry-run", is_flag=True, help="List what would be torn down; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def down(run_ref: str | None, dry_run: bool, yes: bool) -> None:
    """Find and remove every machine cloudtune started that is still up (or only RUN's)."""
    from .lifecycle import check_all_gone, find_machines, tear_down
    from .render import RichEvents

    problems: list[str] = []
    machines = find_machines(run_ref, problems=problems)
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {escape(problem)}")
    if not machines:
        console.print("nothing to tear down: every machine in the ledger is terminated")
        return
    for machine in machines:
        console.print(f"{machine.name}  run {machine.run_id}  backend {machine.backend}  status {machine.status}")
    if dry_run:
        return
    if not yes and not click.confirm(f"tear down {len(machines)} machine(s)?", default=True):
        return
    results = tear_down(machines, RichEvents(console))
    for result in results:
        verdict = "[green]terminated[/]" if result.verified else "[red]not verified gone[/]"
        console.print(f"{result.machine}: {verdict}")
    check_all_gone(results)


@cli.command()
@click.option("--backend", "-b", default=registry.DEFAULT_BACKEND, show_default=True, envvar="CLOUDTUNE_BACKEND",
              help=registry.backend_help())
@json_option
def check(backend: str, as_json: bool) -> None:
    """Which clouds can be rented on, what each other one is missing, and where SkyPilot's API server runs."""
    from .backends.capabilities import ChecksSetup
    from .render import RichEvents, check_table

    chosen = registry.create(backend, {}, RichEvents(err_console))
    if not isinstance(chosen, ChecksSetup):
        raise CloudtuneError(f"the {backend} backend rents nothing, so there is nothing to check.",
                             "Leave out --backend: `cloudtune check` checks SkyPilot's clouds.")
    report = chosen.check_setup()
    if as_json:
        _print_json(report)
        return
    console.print(check_table(report["clouds"]))
    server = report["server"]
    where = "local" if server["local"] else "remote"
    console.print(f"SkyPilot API server: {where} at {escape(server['url'])} "
                  f"({'answering' if server['healthy'] else 'not answering'}; {escape(server['stop'])})")
    if not any(cloud["enabled"] for cloud in report["clouds"].values()):
        console.print("[yellow]no cloud is enabled:[/] set up one cloud's credentials and install its extra, "
                      "then run [bold]cloudtune check[/] again")


# ----------------------------------------------------------------------------------------------
# cost / gpus: dollars per run before renting


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--gpu", help="Only this GPU (A10 also matches A10G; A100 and H100 match their variants).")
@click.option("--spot/--on-demand", default=None, help="Price spot instances (default: compute.spot).")
@click.option("--cloud", "clouds", multiple=True, help="Only these clouds (repeat the option for several).")
@click.option("--top", default=15, show_default=True, type=click.IntRange(min=1), help="How many offers to show.")
@json_option
def cost(recipe_path: Path, gpu: str | None, spot: bool | None, clouds: tuple[str, ...], top: int,
         as_json: bool) -> None:
    """Dollars for the whole run of RECIPE on every GPU offer, cheapest that fits first."""
    from .datasets import inspect_dataset
    from .planning.planner import make_plan
    from .recipe import load_recipe
    from .render import cost_table

    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe, inspect_dataset(recipe), gpu=gpu, clouds=list(clouds) or None, spot=spot)
    if as_json:
        _print_json({"recipe": str(recipe_path), **plan.as_dict(limit=top), "offers_total": len(plan.estimates)})
        return
    exactness = "exact" if plan.tokens_exact else "estimated"
    title = (f"{recipe_path}: {plan.tokens:,} tokens over the run ({exactness}), {recipe.method}, "
             f"model shape from {plan.model_source}\n{plan.catalog.get('prices', plan.snapshot_date)}")
    console.print(cost_table(plan, title, top))
    chosen = plan.chosen
    if chosen:
        console.print(f"[bold green]cheapest that fits:[/] {chosen.offer.gpu}×{chosen.offer.gpu_count} on "
                      f"{chosen.offer.cloud}, ${chosen.cost_low:.2f}–${chosen.cost_high:.2f} for the whole run")
        console.print(f"  [dim]{escape(chosen.why)}[/]")
    else:
        console.print(f"[bold red]no offer fits:[/] {escape(plan.estimates[0].why)}")
    hidden = len(plan.estimates) - top
    misfits = [e for e in plan.estimates if not e.fits]
    if hidden > 0:
        console.print(f"[dim]{hidden} more offer(s) not shown (--top); {len(misfits)} of {len(plan.estimates)} "
                      "do not fit[/]")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


@cli.command()
@click.option("--gpu", help="Only this GPU (family names match every variant).")
@click.option("--cloud", "clouds", multiple=True, help="Only these clouds.")
@click.option("--refresh", is_flag=True, help="Ask SkyPilot for fresh price catalogs first (needs network).")
@json_option
def gpus(gpu: str | None, clouds: tuple[str, ...], refresh: bool, as_json: bool) -> None:
    """GPU offers and their prices, cheapest first."""
    from .planning.gpus import SPECS
    from .planning.offers import gpu_offers
    from .render import gpus_table

    found = gpu_offers(gpu, list(clouds) or None, refresh)
    catalog, refreshed, note = found.catalog, found.refreshed, found.note
    if as_json:
        _print_json({**catalog.as_dict(), "refresh": [r.__dict__ for r in refreshed], "note": note})
        return
    out = err_console
    if refreshed and all(r.message == "no network" for r in refreshed):
        out.print("[yellow]no network: SkyPilot's catalog repository cannot be reached; "
                  f"showing the prices of {catalog.snapshot_date}[/]")
    for result in refreshed:
        if result.message != "no network":
            colour = "green" if result.ok else "red"
            out.print(f"[{colour}]{result.cloud}: {'refreshed' if result.ok else 'not refreshed'}[/] "
                      f"({escape(result.message)})")
    console.print(gpus_table(catalog, f"GPU offers, cheapest first · {catalog.describe()}", SPECS))
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for problem in catalog.problems:
        console.print(f"[red]{escape(problem)}[/]")
    if catalog.skipped:
        console.print("[dim]not planned on: " + "; ".join(f"{name} ({why})" for name, why in
                                                         sorted(catalog.skipped.items())) + "[/]")


# ----------------------------------------------------------------------------------------------
# cloud runs (SkyPilot): plan, dry run, pull again


def _show_dry_run(shown: dict, as_json: bool) -> None:
    from .render import launch_order_table

    if as_json:
        _print_json({key: value for key, value in shown.items() if key != "yaml"})
        return
    console.print(launch_order_table(shown, shown["prices"]))
    for note in shown["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"[bold]{escape(shown['task_title'])}[/]:")
    console.print(shown["yaml"], markup=False, highlight=False, soft_wrap=True)


@cli.command()
@click.argument("run_ref", metavar="RUN", default="last")
@json_option
def pull(run_ref: str, as_json: bool) -> None:
    """Fetch the outputs of a run whose pull failed (its machine was left up), then tear the machine down."""
    from .lifecycle import pull_again
    from .render import RichEvents, receipt_table

    result = pull_again(run_ref, RichEvents(err_console if as_json else console))
    if as_json:
        _print_json(result.receipt)
    else:
        console.print(receipt_table(result.receipt))


@cli.command()
@click.argument("run_ref", metavar="RUN", default="last")
@click.option("--open", "open_it", is_flag=True, help="Open the page in the browser.")
def report(run_ref: str, open_it: bool) -> None:
    """Draw RUN's training (loss, eval loss, learning rate, tokens/s) and write an HTML page beside its outputs."""
    from .report import output_dir_of, write_report

    written = write_report(output_dir_of(run_ref))
    console.print(f"wrote [bold]{escape(str(written.html))}[/] and {escape(written.png.name)}")
    if open_it:
        click.launch(written.html.as_uri())


@cli.command(name="export")
@click.argument("run_ref", metavar="RUN", default="last")
@click.option("--gguf", "kinds", multiple=True, required=True, type=click.Choice(["f16", "q8_0"]),
              help="Write the merged model as GGUF of this type (repeat for several); needs cloudtune[train].")
def export_command(run_ref: str, kinds: tuple[str, ...]) -> None:
    """Write RUN's merged model as GGUF files (llama.cpp, Ollama, LM Studio) beside its outputs, each read back."""
    from .report import output_dir_of

    try:
        from .train.gguf import export_run
    except ImportError as exc:  # the laptop install has no torch; the export merges weights here
        raise CloudtuneError(f"cloudtune export needs the training packages ({exc.name} is missing).",
                             "pip install 'cloudtune[train]'") from None

    for written in export_run(output_dir_of(run_ref), list(dict.fromkeys(kinds))):
        console.print(f"{escape(written['file'])}: {written['bytes']:,} bytes, {written['tensors']} tensors read back")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is: the run is stopped, torn down and marked cancelled."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, _frame) -> None:
    if signum == signal.SIGHUP:  # the terminal is gone: printing to it would fail halfway through teardown
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends
    raise Terminated(signum)


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    cli(prog_name="cloudtune")


if __name__ == "__main__":
    sys.exit(main())
