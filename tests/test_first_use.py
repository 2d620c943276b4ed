"""First use that feels finished (issue 16): a spinner saying what takes seconds, hub datasets priced only
where their size is known, a training log that is ours, `cloudtune clean`, completion."""
from __future__ import annotations

import io
import time

from click.testing import CliRunner
from rich.console import Console

from cloudtune.cli import cli
from cloudtune.events import Events
from cloudtune.render import RichEvents, spinner


def invoke(*args: str, **kwargs):
    return CliRunner(mix_stderr=False).invoke(cli, list(args), **kwargs)


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_a_spinner_says_what_is_happening_only_once_it_takes_a_while_and_only_on_a_terminal():
    console, out = _terminal()
    with spinner("importing SkyPilot", console, after=0.05):
        time.sleep(0.4)
    assert "importing SkyPilot" in out.getvalue()

    console, quick = _terminal()
    with spinner("importing SkyPilot", console, after=0.3):
        pass
    time.sleep(0.4)  # the timer was cancelled: nothing appears later either
    assert quick.getvalue() == ""

    piped = io.StringIO()
    with spinner("importing SkyPilot", Console(file=piped, force_terminal=False), after=0.0):
        time.sleep(0.2)
    assert piped.getvalue() == ""


def test_the_core_says_what_takes_seconds_through_events_and_the_cli_shows_it_on_stderr():
    console, out = _terminal()
    status, shown = _terminal()
    events = RichEvents(console, status)
    with events.busy("building the bundle"):
        time.sleep(1.3)
    assert "building the bundle" in shown.getvalue() and out.getvalue() == ""
    with Events().busy("nothing to show"):  # the default hook does nothing
        pass


def test_library_noise_goes_to_the_debug_log_redacted_and_the_streamed_log_keeps_ours(tmp_path):
    """What liger-kernel and dependencies print on every GPU run stays out of train.log; debug.log keeps
    every line, and a secret in a noise line is redacted there as everywhere."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    value = "hf_" + "DebugLogSecretValue" * 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("secrets: [HF_TOKEN]\n")
    debug = tmp_path / "out" / "debug.log"
    debug.parent.mkdir()  # the trainer's --out, made once the run is known to start
    code = ("import os, sys, warnings\n"
            "from pathlib import Path\n"
            "from cloudtune.train.redacted_output import redacted_output, secret_values\n"
            f"with redacted_output(secret_values(Path({str(recipe)!r})), debug_log=Path({str(debug)!r})):\n"
            "    print('step 1/3 loss 5.52', flush=True)\n"
            "    os.write(2, b\"Backend impl 'liger_kernel.ops.backends._cutedsl.rope' for op 'rope' could not be \"\n"
            "             b\"imported: ImportError: cutedsl backend requires ...\\n\")\n"
            "    warnings.warn_explicit('invalid escape sequence', SyntaxWarning, "
            "'/venv/site-packages/somelib/util.py', 12)\n"
            "    warnings.warn_explicit('torch_dtype is deprecated, token ' + os.environ['HF_TOKEN'], "
            "FutureWarning, '/venv/site-packages/transformers/x.py', 3)\n"
            "    warnings.warn('eval_steps exceeds max_steps: no evaluation runs', UserWarning)\n"
            "    print('step 3/3 loss 1.20', flush=True)\n"
            "    print('cloudtune: token ' + os.environ['HF_TOKEN'], file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_TOKEN": value, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    streamed = done.stdout + done.stderr
    assert done.stdout.splitlines() == ["step 1/3 loss 5.52", "step 3/3 loss 1.20"]
    assert "liger" not in streamed and "SyntaxWarning" not in streamed and "FutureWarning" not in streamed
    assert "UserWarning: eval_steps exceeds max_steps" in done.stderr  # a warning that matters stays
    assert "cloudtune: token <redacted>" in done.stderr
    kept = debug.read_text()
    for line in ("step 1/3 loss 5.52", "Backend impl 'liger_kernel.ops.backends._cutedsl.rope'",
                 "somelib/util.py:12: SyntaxWarning: invalid escape sequence",
                 "FutureWarning: torch_dtype is deprecated, token <redacted>", "UserWarning: eval_steps"):
        assert line in kept
    assert value not in kept + streamed


def _complete(words: str) -> list[str]:
    """What bash completion offers for the last word of `words` (click's own completion protocol)."""
    done = CliRunner().invoke(cli, [], prog_name="cloudtune", env={
        "_CLOUDTUNE_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)})
    return [line.split(",", 1)[1] for line in done.output.splitlines()]


def test_shell_completion_knows_templates_backends_gpus_and_run_ids(ct_home):
    from cloudtune import templates
    from cloudtune.ledger import Ledger

    assert "demo-tiny" in _complete("cloudtune init --template d")
    assert set(_complete("cloudtune init -t ")) == set(templates.summaries())
    assert _complete("cloudtune run --backend s") == ["skypilot", "ssh"]
    assert _complete("cloudtune cost --gpu H10") == ["H100", "H100-PCIE", "H100-NVL"]
    assert _complete("cloudtune logs ") == ["last"]  # no ledger yet: nothing else, and no ledger is created
    assert not (ct_home / "ledger.db").exists()
    ledger = Ledger()
    first, second = ledger.add_new_run(name="demo", backend="local"), ledger.add_new_run(name="b", backend="local")
    assert set(_complete("cloudtune logs ")) == {"last", first, second}
    assert _complete(f"cloudtune down {first}") == [first]
    assert set(_complete("cloudtune run --resume 2")) == {first, second}


# ------------------------------------------------------------------------------------------------
# hub datasets: their size read from the hub (a real HTTP server on 127.0.0.1), or UNKNOWN, loudly


class _Hub:
    """The hub's dataset API and the datasets-server's size API, as they answer, for a few datasets."""

    CARDS = {"acme/chat": {"id": "acme/chat", "cardData": {"dataset_info": {
        "features": [{"name": "text", "dtype": "string"}],
        "splits": [{"name": "train", "num_bytes": 7_200_000, "num_examples": 4000},
                   {"name": "test", "num_bytes": 72_000, "num_examples": 40}]}}},
        "acme/configs": {"id": "acme/configs", "cardData": {"dataset_info": [
            {"config_name": "small", "splits": [{"name": "train", "num_examples": 300}]},
            {"config_name": "default", "splits": [{"name": "train", "num_examples": 900}]}]}},
        "acme/nocard": {"id": "acme/nocard", "cardData": {"license": "mit"}},
        "acme/nosize": {"id": "acme/nosize"}}
    SIZES = {"acme/nocard": {"size": {"splits": [
        {"dataset": "acme/nocard", "config": "default", "split": "train", "num_rows": 2500,
         "num_bytes_memory": 3_600_000}]}, "pending": [], "failed": [], "partial": False}}

    def __init__(self):
        import http.server
        import threading

        hub = self
        self.requests: list[tuple[str, str | None]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                import json
                import urllib.parse

                url = urllib.parse.urlsplit(self.path)
                hub.requests.append((self.path, self.headers.get("Authorization")))
                if url.path.startswith("/api/datasets/"):
                    body = hub.CARDS.get(url.path.removeprefix("/api/datasets/"))
                elif url.path == "/size":
                    body = hub.SIZES.get(urllib.parse.parse_qs(url.query)["dataset"][0])
                else:
                    body = None
                data = json.dumps(body or {"error": "Dataset not found"}).encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _hub_recipe(folder, hub: str, **dataset) -> str:
    import yaml

    from .conftest import write_recipe

    return str(write_recipe(folder, yaml.safe_dump({"model": "meta-llama/Llama-2-7b-hf", "method": "qlora",
                                                    "dataset": {"hub": hub, "format": "completion", **dataset}}),
                            name=f"{hub.replace('/', '-')}.yaml"))


def test_with_network_a_hub_datasets_size_is_read_from_the_hub_before_pricing(tmp_path, monkeypatch):
    import json

    hub = _Hub()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("CLOUDTUNE_DATASETS_SERVER", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_" + "HubSizeTokenValue" * 2)

        card = json.loads(invoke("cost", "--json", "--top", "1", _hub_recipe(tmp_path, "acme/chat")).stdout)
        assert card["training_priced"] is True
        # 4,000 rows of 1,800 bytes ≈ 500 tokens each (3.6 characters a token), capped at max_seq_len
        assert 4000 * 300 < card["tokens"] < 4000 * 600
        assert any("4,000 rows from the hub's dataset card" in note for note in card["notes"])
        assert ("/api/datasets/acme/chat", "Bearer hf_" + "HubSizeTokenValue" * 2) in hub.requests

        shown = invoke("validate", _hub_recipe(tmp_path, "acme/configs", subset="small"))
        assert shown.exit_code == 0 and "rows 300" in " ".join(shown.stdout.split()), shown.stdout

        served = json.loads(invoke("validate", "--json", _hub_recipe(tmp_path, "acme/nocard")).stdout)["dataset"]
        assert served["rows"] == 2500 and served["size_known"] and "datasets-server" in served["size_note"]

        unknown = json.loads(invoke("cost", "--json", "--top", "1", _hub_recipe(tmp_path, "acme/nosize")).stdout)
        assert unknown["training_priced"] is False and unknown["tokens"] == 0
        assert any("size UNKNOWN (the hub states no row count for split train)" in n for n in unknown["notes"])
    finally:
        hub.close()


def test_without_network_a_hub_datasets_size_is_unknown_loudly_and_only_the_known_part_is_priced(tmp_path,
                                                                                                monkeypatch):
    from .conftest import free_port

    hub = _Hub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        recipe = _hub_recipe(tmp_path, "acme/chat")
        offline = invoke("cost", recipe)  # HF_HUB_OFFLINE=1 (conftest): the hub is not even asked
        assert offline.exit_code == 0 and not hub.requests
        said = " ".join(offline.stdout.split())
        assert "tokens UNKNOWN: only provisioning, setup, downloads and teardown are priced" in said
        assert "before training, which is not priced (+?)" in said and "for the whole run" not in said
        assert "HF_HUB_OFFLINE is set" in said and "+?" in offline.stdout

        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody answers there
        shown = invoke("validate", recipe)
        assert shown.exit_code == 0 and "rows UNKNOWN" in " ".join(shown.stdout.split())
        assert "cannot be reached" in " ".join(shown.stdout.split())

        refused = invoke("run", "--backend", "skypilot", "--dry-run", "--max-cost", "5", recipe)
        assert refused.exit_code == 2 and "max_cost $5.00 cannot be checked" in refused.stderr
        ran = invoke("run", "--backend", "skypilot", "--dry-run", "--json", "--max-cost", "5",
                     _hub_recipe(tmp_path, "acme/chat", max_rows=10))
        assert ran.exit_code == 2  # max_rows does not make an unknown size known
    finally:
        hub.close()


def test_a_dry_run_checks_what_the_run_checks_before_renting(tmp_path, monkeypatch):
    """push_to_hub needs HF_TOKEN: the real run refuses before renting when it is unset, so the dry run must too."""
    import yaml

    from .conftest import write_recipe

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token from `hf auth login` either
    recipe = write_recipe(tmp_path, yaml.safe_dump({
        "model": "meta-llama/Llama-2-7b-hf", "method": "qlora", "secrets": ["HF_TOKEN"],
        "dataset": {"hub": "mlabonne/guanaco-llama2-1k", "format": "llama2-inst"},
        "outputs": {"push_to_hub": "me/adapter"}}))
    refused = invoke("run", "--backend", "skypilot", "--dry-run", str(recipe))
    assert refused.exit_code == 2, refused.stderr
    assert "secrets named in the recipe are not set: HF_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cost_gpus_and_the_dry_run_mark_offers_on_clouds_not_enabled_here(tmp_path):
    import json

    from cloudtune.planning import enabled

    from .conftest import DEMO_RECIPE

    never = invoke("gpus", "--top", "40")
    assert "which of these clouds you can rent on is not known yet: `cloudtune check`" in " ".join(
        never.stdout.split())
    assert json.loads(invoke("gpus", "--json").stdout)["enabled_clouds"] is None

    enabled.remember(["aws", "lambda"])  # what `cloudtune check` (or a launch) found
    listed = invoke("gpus", "--top", "40")
    rows = [line.split() for line in listed.stdout.splitlines()]
    clouds = {cell.rstrip("†"): cell.endswith("†") for row in rows for cell in row
              if cell.rstrip("†") in {"aws", "lambda", "vast", "runpod", "gcp", "azure"}}
    assert clouds["aws"] is False and clouds["lambda"] is False and clouds.get("vast", True) is True
    assert any(marked for marked in clouds.values())
    said = " ".join(listed.stdout.split())
    assert "† not enabled here (`cloudtune check` of" in said and "aws" not in said.split("not enabled here")[1]
    priced = json.loads(invoke("cost", "--json", str(DEMO_RECIPE)).stdout)
    assert priced["enabled_clouds"]["enabled"] == ["aws", "lambda"]
    table = invoke("cost", "--top", "30", str(DEMO_RECIPE))
    assert "†" in table.stdout and "not enabled here" in table.stdout


def test_clean_frees_what_finished_runs_left_and_never_what_is_still_needed(tmp_path, ct_home):
    import json

    from cloudtune.ledger import Ledger

    ledger = Ledger()
    runs = {status: ledger.add_new_run(name=status, backend="local") for status in ("succeeded", "failed", "running")}
    outputs = tmp_path / "outputs" / "done"
    outputs.mkdir(parents=True)
    (outputs / "manifest.json").write_text('{"files": {}}')
    ledger.update_run(runs["succeeded"], status="succeeded", output_dir=str(outputs))
    ledger.update_run(runs["failed"], status="failed", output_dir=str(tmp_path / "outputs" / "never-arrived"))
    ledger.update_run(runs["running"], status="running")
    for run_id in runs.values():
        folder = ct_home / "runs" / run_id
        (folder / "machine" / "out" / "adapter").mkdir(parents=True)
        (folder / "machine" / "out" / "adapter" / "weights").write_bytes(b"w" * 5000)
        (folder / "checkpoint" / "step-3").mkdir(parents=True)
        (folder / "bundle.tar.gz").write_bytes(b"b" * 3000)
        (folder / "machine" / "train.log").write_text("step 1/3\n")

    dry = json.loads(invoke("clean", "--dry-run", "--json").stdout)
    listed = {(item["run_id"], item["path"].split(item["run_id"] + "/")[1]) for item in dry["freed"]}
    assert listed == {(runs["succeeded"], "bundle.tar.gz"), (runs["succeeded"], "machine/out"),
                      (runs["failed"], "bundle.tar.gz")}
    assert dry["freed_bytes"] == 3000 + 5000 + 3000 and dry["dry_run"] is True
    assert all((ct_home / "runs" / run_id / "bundle.tar.gz").exists() for run_id in runs.values())

    done = invoke("clean")
    assert done.exit_code == 0 and "freed 11 KiB in 3 place(s)" in done.stdout, done.stdout
    assert runs["succeeded"] in done.stdout  # the run id printed whole
    ours = ct_home / "runs" / runs["succeeded"]
    assert not (ours / "machine" / "out").exists() and not (ours / "bundle.tar.gz").exists()
    assert (ours / "checkpoint" / "step-3").is_dir() and (ours / "machine" / "train.log").is_file()
    assert (outputs / "manifest.json").is_file()  # the user's pulled outputs
    assert (ct_home / "runs" / runs["failed"] / "machine" / "out" / "adapter" / "weights").is_file()  # pull again
    assert (ct_home / "runs" / runs["running"] / "bundle.tar.gz").is_file()  # still going
    assert invoke("clean").stdout.strip() == "nothing to clean: no finished run left a copy behind"


def test_gpus_and_help_start_without_the_recipe_models_and_cost_without_the_backends(tmp_path):
    """The structure that keeps a cold `gpus` and `--help` well under a second (bench/cold_start.py has the
    figures): neither imports pydantic or the recipe, and `cost` loads no backend."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import DEMO_RECIPE

    code = ("import json, sys; from cloudtune.cli import main; sys.argv = ['cloudtune', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', json.dumps(sorted(m for m in sys.modules\n"
            "                                  if m.split('.')[0] in ('pydantic', 'cloudtune'))))")
    env = {**os.environ, "HOME": str(tmp_path), "CLOUDTUNE_HOME": str(tmp_path / "ct")}

    def loaded(*args: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)
        assert "LOADED" in done.stdout, done.stdout + done.stderr
        return json.loads(done.stdout.rsplit("LOADED", 1)[1])

    for args in (["--help"], ["gpus", "--top", "3"]):
        modules = loaded(*args)
        assert "pydantic" not in modules and "cloudtune.recipe" not in modules, (args, modules)
        assert "cloudtune.planning.offers" in modules or args == ["--help"]  # gpus did price
    modules = loaded("cost", str(DEMO_RECIPE))
    assert "cloudtune.planning.planner" in modules
    assert not [m for m in modules if m.startswith("cloudtune.backends.") and m != "cloudtune.backends.registry"], \
        modules


def test_template_headers_leave_the_memory_figure_to_cost():
    """`cost` is the one figure for what a recipe needs: a header that said "needs ≥ 80 GB" while `cost` fitted
    the recipe on a 48 GB card told a newcomer two things."""
    import re

    from cloudtune import templates

    for name, entry in templates.templates().items():
        header = "".join(line for line in entry.read_text().splitlines(keepends=True) if line.startswith("#"))
        assert not re.search(r"\d\s*(GB|GiB)\b|\b\d+G\b", header), (name, header)  # 80 GB, 39G; not A10G
