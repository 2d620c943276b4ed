"""The backend seam: a backend that exists only in this file drives every command through the CLI.

It registers itself (registry.register) and changes nothing outside this module, which is the proof
that a new place to train touches only its own code and its registry entry. Its "machine" is a
folder on a shelf; its "training" writes the outputs a real trainer writes (log, run.json, an
adapter file, the checksummed manifest), so the lifecycle's pull, verification and receipt are real.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import Field

from cloudtune import manifest
from cloudtune.backends import registry
from cloudtune.backends.base import Backend, BackendOptions, Bundle, MachineState, RunContext
from cloudtune.backends.capabilities import ListsMachines
from cloudtune.cli import cli
from cloudtune.ledger import Ledger

from .conftest import demo_recipe_text, write_recipe

SHELF_STEPS = 5


class ShelfOptions(BackendOptions):
    shelf: Path | None = Field(None, description="folder the machines are made in.")
    break_pull: bool = Field(False, description="corrupt the adapter on the first pull (a flaky network).")
    fail_teardown: bool = Field(False, description="make tearing this machine down raise.")

    def check_for_launch(self) -> None:
        from cloudtune.errors import CloudtuneError

        if self.shelf is None:
            raise CloudtuneError("--backend shelf needs --shelf DIR.")


class ShelfState(MachineState):
    folder: str | None = None
    break_pull: bool = False
    fail_teardown: bool = False


class ShelfBackend(Backend, ListsMachines):
    name = "shelf"
    Options = ShelfOptions
    State = ShelfState

    def provision(self, ctx: RunContext) -> None:
        folder = self.options.shelf / ctx.machine
        folder.mkdir(parents=True)
        ctx.state.folder = str(folder)
        ctx.state.break_pull, ctx.state.fail_teardown = self.options.break_pull, self.options.fail_teardown

    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        shutil.copy(bundle.path, Path(ctx.state.folder) / "bundle.tar.gz")

    def start(self, ctx: RunContext, resume: bool = False) -> None:
        folder = Path(ctx.state.folder)
        out = folder / "out"
        (out / "adapter").mkdir(parents=True)
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
        lines = [f"step {step}/{SHELF_STEPS} loss {2.0 / step:.3f}" for step in range(1, SHELF_STEPS + 1)]
        (folder / "train.log").write_text("\n".join(lines + ["done: adapter saved"]) + "\n")
        (out / "run.json").write_text(json.dumps({"weights_dir": "adapter", "steps": SHELF_STEPS, "tokens": 640,
                                                  "train_seconds": 1.5, "tokens_per_s": 426.7, "final_loss": 0.4,
                                                  "device": "shelf"}))
        manifest.write_manifest(out)
        (folder / "exit_code").write_text("0")

    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        log = Path(ctx.state.folder) / "train.log"
        yield from log.read_text().splitlines() if log.exists() else []

    def exit_code(self, ctx: RunContext) -> int | None:
        return int((Path(ctx.state.folder) / "exit_code").read_text())

    def pull(self, ctx: RunContext, staging: Path) -> None:
        shutil.copytree(Path(ctx.state.folder) / "out", staging)
        if ctx.state.break_pull:
            ctx.state.break_pull = False
            (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"garbled")

    def stop(self, ctx: RunContext) -> None:
        pass

    def teardown(self, ctx: RunContext) -> bool:
        if ctx.state.fail_teardown:
            raise OSError("the shelf is stuck")
        shutil.rmtree(ctx.state.folder, ignore_errors=True)
        return not Path(ctx.state.folder).exists()

    def list_machines(self) -> dict[str, str]:
        return {}


@pytest.fixture
def shelf(tmp_path, ct_home, monkeypatch):
    registry.register(registry.BackendEntry("shelf", "folders on a shelf, for the seam's test",
                                            f"{__name__}:ShelfBackend", f"{__name__}:ShelfOptions"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "shelf"
    registry.unregister("shelf")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def shelf_run(tmp_path: Path, shelf: Path, *flags: str):
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=2), name=f"recipe-{len(flags)}.yaml")
    return invoke("run", "--backend", "shelf", "--shelf", str(shelf), *flags, str(recipe))


def test_a_backend_from_the_tests_runs_status_logs_pull_and_down_through_the_cli(tmp_path, shelf):
    assert "--break-pull" in invoke("run", "--help").output  # its flags come from its options

    done = shelf_run(tmp_path, shelf)
    assert done.exit_code == 0, done.output
    assert "receipt" in done.output and "shelf" in done.output
    first = Ledger().runs(1)[0]
    assert first["status"] == "succeeded" and first["backend"] == "shelf"
    adapter = Path(first["output_dir"]) / "adapter" / "adapter_model.safetensors"
    assert adapter.read_bytes() == b"weights" * 100
    assert Ledger().machine_for_run(first["id"])["status"] == "terminated"

    failed = shelf_run(tmp_path, shelf, "--break-pull")
    assert failed.exit_code == 1 and "checksum mismatch" in failed.output, failed.output
    second = Ledger().runs(1)[0]
    assert f"cloudtune pull {second['id']}" in failed.output
    machine = Ledger().machine_for_run(second["id"])
    assert machine["status"] == "up" and machine["meta"]["pull_failed"] is True

    status = invoke("status", "--json")
    assert [run["id"] for run in json.loads(status.output)] == [second["id"], first["id"]]
    logs = invoke("logs", second["id"])
    assert logs.exit_code == 0 and logs.output.splitlines()[-1] == "done: adapter saved"

    pulled = invoke("pull", second["id"])
    assert pulled.exit_code == 0, pulled.output
    assert (Path(second["output_dir"]) / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights" * 100
    assert Ledger().get_run(second["id"])["status"] == "succeeded"
    assert Ledger().machine_for_run(second["id"])["status"] == "terminated"

    shelf_run(tmp_path, shelf, "--break-pull")
    third = Ledger().runs(1)[0]
    downed = invoke("down", "--yes")
    assert downed.exit_code == 0 and f"ct-{third['id']}: terminated" in downed.output, downed.output
    assert not (shelf / f"ct-{third['id']}").exists()
    assert invoke("down", "--yes").output.startswith("nothing to tear down")


def test_a_flag_of_another_backend_is_refused(tmp_path, shelf):
    recipe = write_recipe(tmp_path, demo_recipe_text(max_steps=2))
    result = invoke("run", "--backend", "local", "--break-pull", str(recipe))
    assert result.exit_code == 2 and "--break-pull only applies to --backend shelf" in result.output
    result = invoke("run", "--backend", "shelf", str(recipe))
    assert result.exit_code == 2 and "needs --shelf" in result.output


def test_down_goes_on_past_a_machine_whose_teardown_raises(tmp_path, shelf):
    for flags in (("--break-pull",), ("--break-pull", "--fail-teardown"), ("--break-pull",)):
        assert shelf_run(tmp_path, shelf, *flags).exit_code == 1
    first, second, third = reversed(Ledger().runs(3))

    result = invoke("down", "--yes")
    assert result.exit_code == 1, result.output
    assert f"ct-{first['id']}: terminated" in result.output and f"ct-{third['id']}: terminated" in result.output
    flat = " ".join(result.output.split())
    assert f"tearing down ct-{second['id']} failed (OSError: the shelf is stuck)" in flat
    assert f"cloudtune down {second['id']}" in flat and "1 of 3 machine(s) not verified gone" in flat
    statuses = {run["id"]: Ledger().machine_for_run(run["id"])["status"] for run in (first, second, third)}
    assert statuses == {first["id"]: "terminated", second["id"]: "unknown", third["id"]: "terminated"}
    assert (shelf / f"ct-{second['id']}").is_dir()
