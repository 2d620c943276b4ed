"""`cloudtune report`: the PNG and the self-contained HTML page of a real tiny run."""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.report import FIGURE_DPI, FIGURE_INCHES, smoothed, write_report

from .conftest import module_home
from .test_train import ALPACA, make_recipe, run


@pytest.fixture(scope="module")
def trained(shared_home, tmp_path_factory) -> Path:
    """One tiny run with an eval split and samples, trained in this process."""
    folder = tmp_path_factory.mktemp("report")
    with module_home(shared_home, tmp_path_factory):
        recipe = make_recipe(folder, ALPACA, dataset={"completions_only": True, "eval": 6},
                             training={"max_steps": 12, "eval_steps": 4},
                             outputs={"samples": ["What is 3 plus 4?", "What is <b>5</b> plus 6?"],
                                      "sample_max_new_tokens": 4})
        run(recipe, folder / "out")
    return folder / "out"


def test_the_png_decodes_at_the_expected_size_and_shows_something(trained):
    import matplotlib.image

    written = write_report(trained)
    pixels = matplotlib.image.imread(written.png)
    width, height = (round(inches * FIGURE_DPI) for inches in FIGURE_INCHES)
    assert pixels.shape[:2] == (height, width)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97]}) > 20, "more than a blank canvas"


def test_the_page_holds_the_picture_the_figures_and_the_samples_and_needs_no_network(trained):
    written = write_report(trained)
    page = written.html.read_text()
    inlined = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(inlined) == written.png.read_bytes()
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page and "<link" not in page
    summary = json.loads((trained / "run.json").read_text())
    evaluation = summary["eval"]
    assert f"{summary['final_loss']:.4f}" in page
    assert f"{evaluation['best_loss']:.4f} at step {evaluation['best_step']}" in page
    assert f"{summary['tokens']:,}" in page and f"{summary['steps']} ({summary['epochs']} epochs)" in page
    samples = [json.loads(line) for line in (trained / "samples.jsonl").read_text().splitlines()]
    for sample in samples:
        for text in (sample["prompt"], sample["base"], sample["tuned"]):
            assert html.escape(text) in page
    assert "What is &lt;b&gt;5&lt;/b&gt; plus 6?" in page, "user text is escaped, never markup"
    assert html.escape(str(trained / "adapter")) in page
    assert "completions_only: true" in page, "the recipe as it was trained"


def test_smoothing_is_a_centred_average_that_does_not_lag():
    falling = [float(100 - i) for i in range(100)]
    assert smoothed(falling) == pytest.approx(falling, abs=2.5), "shorter windows at the ends"
    assert smoothed(falling)[50] == falling[50], "centred: a straight line stays where it is"
    assert smoothed([1.0, 3.0, 1.0, 3.0] * 10)[20] == pytest.approx(2.0, abs=0.2)


def test_the_report_command_writes_beside_the_outputs_and_opens_the_page(trained, monkeypatch):
    """No browser can open here, so click.launch is replaced by a recorder."""
    opened = []
    monkeypatch.setattr("click.launch", lambda url, **_: opened.append(url))
    result = CliRunner().invoke(cli, ["report", str(trained), "--open"])
    assert result.exit_code == 0, result.output
    assert (trained / "report.html").is_file() and (trained / "report.png").is_file()
    assert opened == [(trained / "report.html").as_uri()]


def test_a_run_without_outputs_is_one_message(tmp_path):
    result = CliRunner().invoke(cli, ["report", "nosuchrun"])
    assert result.exit_code == 2 and "no run 'nosuchrun'" in result.output


# ----------------------------------------------------------------------------------------------
# the page in a real browser: headless Chromium, which `make system-packages` installs


def chromium_render(page: Path, **evaluate: str):
    from .chromium import CHROMIUM, render

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: run `make system-packages` (apt-get install -y chromium).")
    return render(page, 1100, 1400, evaluate)


def test_the_page_renders_in_chromium_with_its_picture_and_no_console_errors(trained):
    import io

    import matplotlib.image

    written = write_report(trained)
    shown = chromium_render(written.html, picture="[...document.images].map(i => [i.complete, i.naturalWidth, "
                                                  "i.naturalHeight])",
                            overflow="document.documentElement.scrollWidth > window.innerWidth",
                            headings="[...document.querySelectorAll('h2')].map(h => h.textContent)")
    assert shown.errors == []
    width, height = (round(inches * FIGURE_DPI) for inches in FIGURE_INCHES)
    assert shown.values["picture"] == [[True, width, height]], "the inlined PNG decoded in the browser"
    assert shown.values["overflow"] is False, "nothing wider than the window"
    assert shown.values["headings"][:2] == ["Receipt", "Estimate against actual"]
    pixels = matplotlib.image.imread(io.BytesIO(shown.png), format="png")
    assert pixels.shape[:2] == (1400, 1100)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97]}) > 20, "more than a blank page"


def test_the_browser_check_sees_console_errors_and_failed_loads(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><html><body><img src="missing.png"><script>console.error("boom");'
                    "undefined_function();</script></body></html>")
    errors = chromium_render(page).errors
    assert "console: boom" in errors
    assert any(e.startswith("exception: ") for e in errors)
    assert any(e.startswith("log (") and "ERR_FILE_NOT_FOUND" in e for e in errors), errors
