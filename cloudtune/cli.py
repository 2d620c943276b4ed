"""The `cloudtune` command: parse arguments, call one function of the core, render what it returns.

Heavy libraries (torch, transformers, sky, paramiko) are never imported at module level, so
`cloudtune --help` answers at once.
"""
from __future__ import annotations

import difflib
import json
import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from . import units
from .backends import registry
from .errors import CloudtuneError, handle
from .gguf_kinds import GGUF_KINDS
from .secrets import redact

# no emoji codes: a message quoting `--gpu A10:x` must not print a red cross
console = Console(highlight=False, emoji=False)
err_console = Console(stderr=True, highlight=False, emoji=False)


def _show_error(message: str, hint: str | None) -> None:
    # soft_wrap keeps paths and commands whole for copy-paste
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[yellow]hint:[/] {escape(hint)}", soft_wrap=True)


class CloudtuneGroup(click.Group):
    """Every error of every command goes through errors.handle: a message and a hint, exit 2 for user
    mistakes, a traceback only with --debug. Messages quote user data (column names, paths, a training's
    log), so the one redaction rule applies here and no command can echo a secret."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            err_console.print(f"[yellow]interrupted ({signal.Signals(signum).name})[/]")
            ctx.exit(128 + signum)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error ends here as a message
            ctx.exit(handle(exc, debug=bool(ctx.params.get("debug")), show=_show_error, redact=redact))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            guess = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.6)
            hint = f" Did you mean {' or '.join(guess)}?" if guess else ""
            raise click.UsageError(f"No such command '{name}'.{hint}", ctx)
        return super().resolve_command(ctx, args)


NOTHING_FITS = 1  # `cost`: no offer can run the recipe
GPUS_SHOWN = 20  # `gpus` without --top

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")


@click.group(cls=CloudtuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="cloudtune")
def cli(debug: bool) -> None:
    """Fine-tune an LLM on the cheapest GPU that fits, for a price known before you pay it."""
    from .ledger import LEDGER_FILE
    from .paths import home

    if not (home() / LEDGER_FILE).exists():
        return  # nothing ever ran here, so nothing to sweep, and `cost` in a fresh HOME skips the lifecycle import
    from .lifecycle import sweep_dead_runs

    sweep_dead_runs()  # a run killed with its CLI left its secrets file behind: gone before anything else


def _print_json(data) -> None:
    click.echo(json.dumps(units.with_units(data), indent=1, default=str))


def _clouds(_ctx, _param, given: tuple[str, ...]) -> list[str] | None:
    """--cloud aws --cloud gcp, or SkyPilot's --cloud aws,gcp."""
    return [cloud.strip() for value in given for cloud in value.split(",") if cloud.strip()] or None


def _gpu(_ctx, _param, given: str | None) -> tuple[str | None, int | None]:
    """--gpu A10, or SkyPilot's --gpu A10:1 / H100:8 (the count sets compute.gpu_count)."""
    from .planning.gpus import split_gpu_count

    return split_gpu_count(given) if given else (None, None)


# Shell completion (`eval "$(_CLOUDTUNE_COMPLETE=bash_source cloudtune)"`): each answers from what is on
# this machine, cheaply, and never fails: a broken ledger completes nothing rather than print a traceback.


def _complete_gpus(_ctx, _param, incomplete: str) -> list[str]:
    from .planning.gpus import SPECS

    return [name for name in SPECS if name.lower().startswith(incomplete.lower())]


def _complete_backends(_ctx, _param, incomplete: str) -> list[str]:
    return [entry.name for entry in registry.entries() if entry.name.startswith(incomplete)]


def _complete_templates(_ctx, _param, incomplete: str) -> list[str]:
    from . import templates

    return [name for name in templates.summaries() if name.startswith(incomplete)]


def _complete_runs(_ctx, _param, incomplete: str) -> list[click.shell_completion.CompletionItem]:
    from click.shell_completion import CompletionItem

    from .ledger import LEDGER_FILE, Ledger
    from .paths import home

    found = [CompletionItem("last", help="the newest run")] if "last".startswith(incomplete) else []
    if not (home() / LEDGER_FILE).exists():
        return found
    try:
        runs = Ledger().runs(50)
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the shell
        return found
    return found + [CompletionItem(run["id"], help=f"{run['status']} {run['name']}") for run in runs
                    if run["id"].startswith(incomplete)]


def _backend(_ctx, _param, name: str) -> str:
    registry.entry(name)  # an unknown name is refused before the recipe is read or a plan printed
    return name


gpu_option = click.option("--gpu", callback=_gpu, metavar="NAME[:COUNT]", shell_complete=_complete_gpus,
                          help="GPU to rent (A10, A100-80GB, H100, ...; A10 also matches A10G, A100 and H100 "
                               "match their variants); NAME:COUNT also sets compute.gpu_count.")
clouds_option = click.option("--cloud", "clouds", multiple=True, callback=_clouds, metavar="CLOUD[,CLOUD]",
                             help="Only these clouds (comma-separated, or repeat the option).")


# ----------------------------------------------------------------------------------------------
# init / validate


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default="recipe.yaml")
@click.option("--template", "-t", default="demo-tiny", show_default=True, shell_complete=_complete_templates,
              help="Which ready recipe to start from (see --list).")
@click.option("--list", "list_only", is_flag=True, help="List the templates and exit.")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@json_option
def init(path: Path, template: str, list_only: bool, force: bool, as_json: bool) -> None:
    """Write a commented recipe to PATH from a ready template."""
    from . import templates
    from .render import grid, text, whole

    if list_only:
        if as_json:
            _print_json(templates.summaries())
            return
        table = grid(whole("template"), text("what it trains"))
        for name, summary in templates.summaries().items():
            table.add_row(name, escape(summary))
        console.print(table)
        return
    written = templates.write(path, template, force)
    if as_json:
        _print_json(written.as_dict())
        return
    console.print(f"wrote [bold]{escape(str(path))}[/] from template {template}", soft_wrap=True)
    for note in written.notes:
        console.print(f"  [dim]{escape(note)}[/]", soft_wrap=True)
    console.print("next:")
    for command in written.next_commands:  # one per line, whole: each is copied as it is
        console.print(f"  [bold]{escape(command)}[/]", soft_wrap=True)


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
    from .render import facts

    exactness = "exact" if report.tokens_exact else "estimated"
    rows = [("model", recipe.model.name or f"init: {recipe.model.init}"),
            ("method", recipe.method + (f" (r={recipe.lora.r}, targets {recipe.lora.target_modules})"
                                        if recipe.uses_lora else "")),
            ("dataset", f"{report.source} ({report.format})")]
    if report.size_known:
        rows += [("rows", units.count(report.rows)),
                 ("tokens", f"{units.count(report.tokens)} per epoch ({exactness}; tokenizer: {report.tokenizer})")]
    else:
        rows += [("rows", "UNKNOWN"), ("tokens", "UNKNOWN (counted on the training machine)")]
    if report.truncated_rows:
        rows.append(("truncated", f"{units.count(report.truncated_rows)} rows longer than max_seq_len "
                                  f"{recipe.training.max_seq_len} (longest {units.count(report.longest_row_tokens)})"))
    if report.eval_rows:
        rows.append(("eval", f"{units.count(report.eval_rows)} rows, {units.count(report.eval_tokens)} tokens "
                             f"({report.eval_source})"))
    facts(console, f"{recipe_path}: valid", rows)
    if report.size_note:
        console.print(f"[{'dim' if report.size_known else 'bold yellow'}]{escape(report.size_note)}[/]",
                      soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# run / status / logs / down


@cli.command(cls=registry.BackendFlagsCommand)
@click.argument("recipe_path", metavar="RECIPE", required=False, type=click.Path(path_type=Path))
@click.option("--backend", "-b", default=registry.DEFAULT_BACKEND, show_default=True, envvar="CLOUDTUNE_BACKEND",
              callback=_backend, shell_complete=_complete_backends, help=registry.backend_help())
@gpu_option
@clouds_option
@click.option("--spot/--on-demand", default=None,
              help="Spot machines, run as a managed job that resumes after preemption; overrides compute.spot.")
@click.option("--max-cost", type=click.FloatRange(min=0, min_open=True), metavar="USD",
              help="Refuse to start when the plan's high estimate exceeds this; overrides compute.max_cost.")
@click.option("--dry-run", is_flag=True, help="Show the plan, the offers in launch order and the SkyPilot task; "
                                              "rent nothing.")
@click.option("--resume", "resume_ref", metavar="RUN", shell_complete=_complete_runs,
              help="Continue RUN (an id, a prefix, or 'last') from the checkpoint it kept when it stopped, on a new "
                   "machine; RECIPE defaults to RUN's recipe, --backend to RUN's backend.")
@json_option
def run(recipe_path: Path | None, backend: str, gpu: tuple[str | None, int | None], clouds: list[str] | None,
        spot: bool | None, max_cost: float | None, dry_run: bool, resume_ref: str | None, as_json: bool,
        **backend_flags) -> None:
    """Train RECIPE end to end: rent, sync, train, stream logs, pull outputs, tear down."""
    from . import lifecycle
    from .recipe import load_recipe, with_compute_overrides
    from .render import RichEvents, receipt

    continues = lifecycle.continuation(resume_ref) if resume_ref else None
    if continues is not None:
        recipe_path = recipe_path or (Path(continues.recipe_path) if continues.recipe_path else None)
        if click.get_current_context().get_parameter_source("backend") == click.core.ParameterSource.DEFAULT:
            backend = continues.backend
    if recipe_path is None:
        raise click.UsageError("Missing argument 'RECIPE'" + (" (the run to resume has no recipe file on record)"
                                                             if continues is not None else "") + ".")
    recipe = with_compute_overrides(load_recipe(recipe_path), gpu=gpu[0], gpu_count=gpu[1], cloud=clouds, spot=spot,
                                    max_cost=max_cost)
    events = RichEvents(err_console if as_json else console, err_console)
    chosen = registry.create(backend, backend_flags, events, launching=not dry_run)
    if dry_run:
        _show_dry_run(lifecycle.preview(recipe, chosen, events, continues), as_json)
        return
    result = lifecycle.run(recipe, chosen, events, continues=continues)
    if as_json:
        _print_json(result.receipt)
    else:
        receipt(console, result.receipt)


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
        console.print(runs_table(runs, console.width))


@cli.command()
@click.argument("run_ref", metavar="[RUN]", default="last", shell_complete=_complete_runs)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the training ends.")
@json_option
def logs(run_ref: str, follow: bool, as_json: bool) -> None:
    """Print a run's training log (RUN is an id, a prefix of one, or 'last', the default)."""
    from .lifecycle import training_log

    found = training_log(run_ref, follow=follow)
    empty = True
    for line in found.lines:
        click.echo(json.dumps({"run_id": found.run_id, "line": line}) if as_json else line)
        empty = False
    if empty:
        err_console.print(f"[yellow]no log:[/] {escape(found.why_empty())}", soft_wrap=True)


@cli.command()
@click.argument("run_ref", metavar="[RUN]", required=False, shell_complete=_complete_runs)
@click.option("--dry-run", is_flag=True, help="List what would be torn down; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed with --json).")
@json_option
def down(run_ref: str | None, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Find and remove every machine cloudtune started that is still up (or only RUN's)."""
    from .lifecycle import check_all_gone, find_machines, tear_down
    from .render import RichEvents, grid, spinner, text, whole

    problems: list[str] = []
    with spinner("asking each backend in use which of its machines are up (SkyPilot: seconds)", err_console):
        machines = find_machines(run_ref, problems=problems)
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {escape(problem)}")
    if as_json and (dry_run or not machines):
        _print_json({"machines": [vars(machine) for machine in machines], "torn_down": [], "problems": problems})
        return
    if not machines:
        console.print("nothing to tear down: every machine in the ledger is terminated")
        return
    table = grid(whole("machine"), text("backend"), text("status"))
    for machine in machines:
        table.add_row(machine.name, machine.backend, escape(machine.status))
    (err_console if as_json else console).print(table)
    if dry_run:
        return
    if not yes and (as_json or not click.confirm(f"tear down {len(machines)} machine(s)?", default=False)):
        err_console.print("nothing torn down" + (": --json needs --yes" if as_json else ""))
        return
    results = tear_down(machines, RichEvents(err_console if as_json else console))
    if as_json:
        _print_json({"machines": [vars(machine) for machine in machines], "problems": problems,
                     "torn_down": [vars(result) for result in results]})
    for result in results:
        verdict = "[green]terminated[/]" if result.verified else "[red]not verified gone[/]"
        (err_console if as_json else console).print(f"{result.machine}: {verdict}")
    check_all_gone(results)


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be freed; delete nothing.")
@json_option
def clean(dry_run: bool, as_json: bool) -> None:
    """Free what finished runs left in $CLOUDTUNE_HOME/runs: bundles, uploads, and a local run's copy of
    outputs already pulled. Never a run still going, your outputs, or a checkpoint kept for --resume."""
    from .lifecycle import clean as clean_runs
    from .render import grid, text, whole

    freed = clean_runs(dry_run=dry_run)
    total = sum(item.bytes for item in freed)
    if as_json:
        _print_json({"dry_run": dry_run, "freed": [vars(item) for item in freed], "freed_bytes": total})
        return
    if not freed:
        console.print("nothing to clean: no finished run left a copy behind")
        return
    table = grid(whole("run"), text("what"), whole("size"))
    for item in freed:
        table.add_row(item.run_id, escape(f"{item.what}: {item.path}"), units.data_size(item.bytes))
    console.print(table)
    verb = "would free" if dry_run else "freed"
    console.print(f"{verb} {units.data_size(total)} in {len(freed)} place(s)")


@cli.command()
@click.option("--backend", "-b", default=registry.DEFAULT_BACKEND, show_default=True, envvar="CLOUDTUNE_BACKEND",
              shell_complete=_complete_backends, help=registry.backend_help())
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
    console.print("[bold]clouds SkyPilot can rent on[/] [dim](`sky check`, run now)[/]")
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
@gpu_option
@click.option("--spot/--on-demand", default=None, help="Price spot instances (default: compute.spot).")
@clouds_option
@click.option("--top", default=15, show_default=True, type=click.IntRange(min=1), help="How many offers to show.")
@json_option
def cost(recipe_path: Path, gpu: tuple[str | None, int | None], spot: bool | None, clouds: list[str] | None,
         top: int, as_json: bool) -> None:
    """Dollars for the whole run of RECIPE on every GPU offer, cheapest that fits first (exit 1: none fits)."""
    from .datasets import inspect_dataset
    from .planning import enabled
    from .planning.planner import make_plan
    from .recipe import load_recipe, with_compute_overrides
    from .render import cost_footer, cost_table, spinner

    recipe = with_compute_overrides(load_recipe(recipe_path), gpu_count=gpu[1])
    with spinner("reading the dataset and pricing every offer", err_console):
        plan = make_plan(recipe, inspect_dataset(recipe), gpu=gpu[0], clouds=clouds, spot=spot)
    known = enabled.last_checked()
    if as_json:
        _print_json({"recipe": str(recipe_path), **plan.as_dict(limit=top), "offers_total": len(plan.estimates),
                     "enabled_clouds": known.as_dict() if known else None})
    else:
        exactness = "exact" if plan.tokens_exact else "estimated"
        tokens = (f"{units.count(plan.tokens)} tokens over the run ({exactness})" if plan.training_priced else
                  "[bold yellow]tokens UNKNOWN[/]: only provisioning, setup, downloads and teardown are priced")
        console.print(f"[bold]{escape(str(recipe_path))}[/]: {tokens}, "
                      f"{recipe.method}, model shape from {escape(plan.model_source)}", soft_wrap=True)
        console.print(f"[dim]{escape(plan.catalog.get('prices', plan.snapshot_date))}[/]")
        shown = {e.offer.cloud for e in plan.estimates[:top]}
        console.print(cost_table(plan, top, console.width, frozenset(known.off(shown)) if known else frozenset()))
        cost_footer(console, plan, top)
        for note in [*plan.notes, enabled.describe(known, shown)]:
            if note:
                console.print(f"[yellow]note:[/] {escape(note)}")
    if plan.chosen is None:
        click.get_current_context().exit(NOTHING_FITS)


@cli.command()
@gpu_option
@clouds_option
@click.option("--spot", is_flag=True, help="Only offers with a spot price, cheapest spot price first.")
@click.option("--top", default=GPUS_SHOWN, show_default=True, type=click.IntRange(min=1),
              help="How many offers to show.")
@click.option("--refresh", is_flag=True, help="Ask SkyPilot for fresh price catalogs first (needs network).")
@json_option
def gpus(gpu: tuple[str | None, int | None], clouds: list[str] | None, spot: bool, top: int, refresh: bool,
         as_json: bool) -> None:
    """GPU offers and their prices, cheapest first."""
    from .planning import enabled
    from .planning.gpus import SPECS
    from .planning.offers import gpu_offers
    from .render import gpus_footer, gpus_table, refresh_report, spinner

    with spinner("asking SkyPilot for fresh catalogs" if refresh else "reading the price catalogs", err_console):
        found = gpu_offers(gpu[0], clouds, refresh, count=gpu[1], spot=spot)
    catalog = found.catalog
    known = enabled.last_checked()
    if as_json:
        _print_json({**catalog.as_dict(), "refresh": [r.__dict__ for r in found.refreshed], "note": found.note,
                     "enabled_clouds": known.as_dict() if known else None})
        return
    refresh_report(err_console, found.refreshed, catalog.snapshot_date)
    console.print(f"[bold]GPU offers, cheapest {'spot price' if spot else 'first'}[/] [dim]· {catalog.describe()}[/]")
    shown = {offer.cloud for offer in catalog.offers[:top]}
    console.print(gpus_table(catalog.offers[:top], SPECS, console.width,
                             frozenset(known.off(shown)) if known else frozenset()))
    gpus_footer(console, found, top, filtered=bool(gpu[0]))
    note = enabled.describe(known, shown)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}")


# ----------------------------------------------------------------------------------------------
# cloud runs (SkyPilot): plan, dry run, pull again


def _show_dry_run(shown: dict, as_json: bool) -> None:
    from .planning import enabled
    from .render import launch_order_table

    known = enabled.last_checked()
    if as_json:
        _print_json({**{key: value for key, value in shown.items() if key != "yaml"},
                     "enabled_clouds": known.as_dict() if known else None})
        return
    clouds = {e["offer"]["cloud"] for e in ([shown["chosen"]] if shown["chosen"] else []) + shown["fallbacks"]}
    console.print(f"[bold]launch order[/]: cheapest run first, then fallbacks [dim]({escape(shown['prices'])})[/]")
    console.print(launch_order_table(shown, console.width, frozenset(known.off(clouds)) if known else frozenset()))
    for note in [*shown["notes"], enabled.describe(known, clouds)]:
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"[bold]{escape(shown['task_title'])}[/]:")
    console.print(shown["yaml"], markup=False, highlight=False, soft_wrap=True)


@cli.command()
@click.argument("run_ref", metavar="RUN", default="last", shell_complete=_complete_runs)
@json_option
def pull(run_ref: str, as_json: bool) -> None:
    """Fetch the outputs of a run whose pull failed (its machine was left up), then tear the machine down."""
    from .lifecycle import pull_again
    from .render import RichEvents, receipt

    result = pull_again(run_ref, RichEvents(err_console if as_json else console))
    if as_json:
        _print_json({**result.receipt, "already_pulled": result.already_pulled})
    elif result.already_pulled:
        console.print(f"already pulled: outputs at {escape(result.receipt['output_dir'])}", soft_wrap=True)
    else:
        receipt(console, result.receipt)


@cli.command()
@click.argument("run_ref", metavar="RUN", default="last", shell_complete=_complete_runs)
@click.option("--open", "open_it", is_flag=True, help="Open the page in the browser.")
def report(run_ref: str, open_it: bool) -> None:
    """Draw RUN's training (loss, eval loss, learning rate, tokens/s) and write an HTML page beside its outputs."""
    from .report import output_dir_of, write_report

    written = write_report(output_dir_of(run_ref))
    console.print(f"wrote [bold]{escape(str(written.html))}[/] and {escape(written.png.name)}")
    if open_it:
        click.launch(written.html.as_uri())


def _training_side(module: str, command: str):
    """A module of cloudtune.train, for a command that runs the model here; the laptop install has no torch."""
    import importlib

    try:
        return importlib.import_module(f".train.{module}", __package__)
    except ImportError as exc:
        if (exc.name or "").startswith("cloudtune"):
            raise
        raise CloudtuneError(f"cloudtune {command} needs the training packages ({exc.name} is missing).",
                             "pip install 'cloudtune[train]'") from None


@cli.command(name="export")
@click.argument("run_ref", metavar="RUN", default="last", shell_complete=_complete_runs)
@click.option("--gguf", "kinds", multiple=True, required=True, type=click.Choice(GGUF_KINDS),
              help="f16 or q8_0: the merged model; lora: the LoRA adapter alone, for llama.cpp's --lora on the base "
                   "(repeat for several); needs cloudtune[train].")
def export_command(run_ref: str, kinds: tuple[str, ...]) -> None:
    """Write RUN's model (merged, or its adapter alone) as GGUF files for llama.cpp, Ollama and LM Studio, beside
    its outputs, each read back."""
    from .report import output_dir_of

    gguf = _training_side("gguf", "export")  # it merges the weights here
    for written in gguf.export_run(output_dir_of(run_ref), list(dict.fromkeys(kinds))):
        console.print(f"{escape(written['file'])}: {written['bytes']:,} bytes, {written['tensors']} tensors read back")


@cli.command(name="try")
@click.argument("run_ref", metavar="RUN", shell_complete=_complete_runs)
@click.argument("prompt", required=False)
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 1_000_000),
              help="The longest answer, in tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0, max=100),
              help="0 answers greedily (the same answer every time); above 0 samples, hotter is more random.")
def try_command(run_ref: str, prompt: str | None, max_new_tokens: int, temperature: float) -> None:
    """Talk to RUN's trained model: PROMPT (or, without it, each line you type until Ctrl-D) is formatted
    as the training data was, chat template included, and the answer streams as it is generated."""
    from .render import spinner
    from .report import output_dir_of

    inference = _training_side("inference", "try")
    output_dir = output_dir_of(run_ref)
    with spinner(f"loading the model of {output_dir}", err_console):
        trained = inference.load_trained(output_dir, inference.default_device())

    def answer(text: str) -> None:
        inference.generate(trained.model, trained.tokenizer, trained.render(text), max_new_tokens=max_new_tokens,
                           temperature=temperature, write=lambda piece: click.echo(piece, nl=False))
        click.echo()

    if prompt is not None:
        answer(prompt)
        return
    err_console.print(f"[dim]{escape(trained.run.get('name', ''))} ({escape(trained.format)} format): one prompt "
                      "per line; Ctrl-D or Ctrl-C ends[/]")
    stdin = click.get_text_stream("stdin")
    try:
        while True:
            click.echo("> ", nl=False, err=True)  # stderr: what stdout carries is the answers alone
            line = stdin.readline()
            if not line:  # Ctrl-D, or the end of a file of prompts
                break
            if line.strip():
                answer(line.rstrip("\r\n"))
    except KeyboardInterrupt:  # Ctrl-C: the user is done, at the prompt or in the middle of an answer
        click.echo()
    click.echo(err=True)


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
    from .render import degrade_to_ascii

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    degrade_to_ascii()
    cli(prog_name="cloudtune")


if __name__ == "__main__":
    sys.exit(main())
