"""`cloudtune report RUN`: a picture of the training and one HTML page that needs no network to view.

Written next to the run's outputs: `report.png` (training loss raw and smoothed, eval loss, learning
rate, tokens/s against steps, drawn by matplotlib's Agg backend) and `report.html` (that picture
inlined as base64, the receipt, estimate against actual, the recipe, samples before and after, and
where the adapter is). Everything shown is escaped and redacted.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CloudtuneError
from .ledger import Ledger
from .secrets import redact

PNG = "report.png"
HTML = "report.html"
RECIPE = "recipe.yaml"
FIGURE_INCHES = (10.0, 9.0)
FIGURE_DPI = 100  # so the picture is 1000 x 900 pixels
SMOOTHING_SHARE = 0.1  # the smoothed loss averages over a tenth of the run's steps


@dataclass(frozen=True)
class Report:
    png: Path
    html: Path


def output_dir_of(run_ref: str, ledger: Ledger | None = None) -> Path:
    """A run's outputs: RUN as a folder holding run.json, or a run id, a prefix of one, or 'last'."""
    given = Path(run_ref).expanduser()
    if (given / "run.json").is_file():
        return given.resolve()
    if given.is_dir():
        raise CloudtuneError(f"{given}: no run.json here, so these are not the outputs of a finished run.",
                             "Give the folder a run's outputs went to, or its run id (`cloudtune status`).")
    run = (ledger or Ledger()).get_run(run_ref)
    out = Path(run["output_dir"]) if run.get("output_dir") else None
    if out is None or not (out / "run.json").is_file():
        raise CloudtuneError(f"run {run['id']} ({run['status']}): no outputs at {out or 'an unknown place'}.",
                             "Only a run whose outputs arrived has a model and metrics; `cloudtune pull RUN` "
                             "fetches them.")
    return out


def write_report(output_dir: Path, receipt: dict[str, Any] | None = None) -> Report:
    """Draw the picture and write the page; `receipt` defaults to the run's receipt.json (or run.json)."""
    receipt = receipt or _read_receipt(output_dir)
    rows = read_metrics(output_dir / "metrics.jsonl")
    png = output_dir / PNG
    draw(rows, png, title=f"{receipt.get('name', '')} · run {receipt.get('run_id', output_dir.name)}")
    page = output_dir / HTML
    page.write_text(render_html(output_dir, receipt, rows, png.read_bytes()), encoding="utf-8")
    return Report(png=png, html=page)


def _read_receipt(output_dir: Path) -> dict[str, Any]:
    from . import receipt

    made = output_dir / receipt.RECEIPT
    return json.loads(made.read_text()) if made.is_file() else receipt.read_run_json(output_dir)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CloudtuneError(f"{path}: no metrics to draw.", "Is this the output folder of a finished run?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # half a line from a training killed while writing it
    return rows


def smoothed(values: list[float], share: float = SMOOTHING_SHARE) -> list[float]:
    """A centred moving average over `share` of the points: unlike an exponential one it does not lag
    behind the raw loss, which on a short run would draw it above every raw point."""
    half = int(len(values) * share / 2)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half):i + half + 1]
        out.append(sum(window) / len(window))
    return out


def draw(rows: list[dict[str, Any]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: the same picture on a laptop, a server and in CI
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=FIGURE_INCHES, dpi=FIGURE_DPI, sharex=True,
                                                   gridspec_kw={"height_ratios": [2, 1, 1]}, layout="constrained")
    try:
        losses = [row["loss"] for row in rows]
        loss_ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="training loss")
        loss_ax.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label="training loss, smoothed")
        evaluated = [row for row in rows if row.get("eval_loss") is not None]
        if evaluated:
            loss_ax.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], color="tab:orange",
                         marker="o", linewidth=2, label="eval loss")
            best = min(evaluated, key=lambda r: r["eval_loss"])
            loss_ax.axvline(best["step"], color="tab:orange", linestyle=":", label=f"best eval, step {best['step']}")
        loss_ax.set_ylabel("loss")
        loss_ax.legend(loc="upper right")
        loss_ax.set_title(title)
        lr_ax.plot(steps, [row["lr"] for row in rows], color="tab:green")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        speed_ax.plot(steps, [row["tokens_per_s"] for row in rows], color="tab:purple")
        speed_ax.set_ylabel("tokens/s")
        speed_ax.set_xlabel("step")
        for ax in (loss_ax, lr_ax, speed_ax):
            ax.grid(alpha=0.3)
        fig.savefig(png, dpi=FIGURE_DPI)  # no bbox_inches="tight": the size stays what FIGURE_* say
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the page


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1060px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; vertical-align: top;
  padding: .3em .6em; border-bottom: 1px solid #eee; } th { width: 14em; color: #555; font-weight: 600; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; } code { background: #f3f3f3; padding: 0 .2em; }
.samples td { width: 33%; white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .9em; }
"""


def _e(value: Any) -> str:
    return html.escape(redact(str(value)))


def _table(pairs: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>" for key, value in pairs if value is not None)
    return f"<table>{cells}</table>"


def render_html(output_dir: Path, receipt: dict[str, Any], rows: list[dict[str, Any]], png: bytes) -> str:
    picture = base64.b64encode(png).decode()
    recipe = output_dir / RECIPE
    weights = receipt.get("weights_path") or str(output_dir / receipt.get("weights_dir", "adapter"))
    sections = [
        f"<h1>{_e(receipt.get('name', 'run'))} · run {_e(receipt.get('run_id', output_dir.name))}</h1>",
        f'<img alt="training loss, eval loss, learning rate and tokens/s against steps" '
        f'src="data:image/png;base64,{picture}">',
        "<h2>Receipt</h2>", _table(receipt_rows(receipt, rows)),
        "<h2>Estimate against actual</h2>", _table(estimate_rows(receipt)),
        "<h2>Samples, before and after training</h2>", samples_html(output_dir),
        "<h2>Where the adapter is</h2>",
        f"<p><code>{_e(weights)}</code>, loadable with <code>PeftModel.from_pretrained</code>; all outputs in "
        f"<code>{_e(output_dir)}</code>.</p>",
        "<h2>Recipe</h2>",
        f"<pre>{_e(recipe.read_text())}</pre>" if recipe.is_file() else "<p>not recorded with these outputs</p>",
    ]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cloudtune report "
            f"{_e(receipt.get('run_id', ''))}</title><style>{STYLE}</style></head><body>{''.join(sections)}"
            "</body></html>\n")


def receipt_rows(receipt: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    from .receipt import scale_rows

    evaluation = receipt.get("eval") or {}
    return [
        ("model", f"{receipt.get('model')} ({receipt.get('method')})"),
        ("device", receipt.get("device")),
        ("backend", receipt.get("backend") and f"{receipt['backend']} ({receipt.get('machine')})"),
        ("steps", f"{receipt.get('steps')} ({receipt.get('epochs')} epochs)"),
        ("tokens trained", f"{receipt.get('tokens', 0):,}"),
        *scale_rows(receipt),
        ("final training loss", _number(receipt.get("final_loss"))),
        ("best eval loss", evaluation.get("best_loss") is not None
         and f"{evaluation['best_loss']:.4f} at step {evaluation['best_step']} "
             f"({evaluation['evaluations']} evaluations of {evaluation['rows']} held-out rows)" or None),
        ("weights kept", evaluation and f"{evaluation.get('kept')} (step {evaluation.get('kept_step')})"
         + ("; stopped early" if evaluation.get("stopped_early") else "") or None),
        ("peak GPU memory", receipt.get("peak_gpu_gib") is not None and f"{receipt['peak_gpu_gib']:.1f} GiB" or None),
        ("metrics", f"{len(rows)} steps in metrics.jsonl"),
    ]


def estimate_rows(receipt: dict[str, Any]) -> list[tuple[str, Any]]:
    estimate = receipt.get("estimate") or {}
    hours = (f"{estimate['est_hours_low'] * 60:.1f}–{estimate['est_hours_high'] * 60:.1f} min"
             if estimate.get("est_hours_low") is not None else "no estimate")
    dollars = (f"${estimate['est_cost_low']:,.2f}–{estimate['est_cost_high']:,.2f}"
               if estimate.get("est_cost_low") is not None else "no estimate")
    actual = receipt.get("actual_cost")
    return [
        ("time: estimate / actual", f"{hours} / {_minutes(receipt.get('wall_seconds'))} "
                                    f"(training itself {_minutes(receipt.get('train_seconds'))})"),
        ("cost: estimate / actual", f"{dollars} / " + (f"${actual:,.2f}" if actual is not None else "not priced")),
        ("offer", estimate.get("gpu") and f"{estimate['gpu']} at ${estimate.get('price_per_hour', 0):.2f}/h"),
    ]


def samples_html(output_dir: Path) -> str:
    path = output_dir / "samples.jsonl"
    if not path.is_file():
        return "<p>none: list prompts under outputs.samples to see some</p>"
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cells = "".join(f"<tr><td>{_e(s['prompt'])}</td><td>{_e(s['base'])}</td><td>{_e(s['tuned'])}</td></tr>"
                    for s in samples)
    return f'<table class="samples"><tr><th>prompt</th><th>before</th><th>after</th></tr>{cells}</table>'


def _number(value: Any) -> str | None:
    return f"{value:.4f}" if isinstance(value, int | float) else None


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"
