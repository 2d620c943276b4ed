"""The SSH backend's Docker mode (`compute.remote_env: docker`) against a real sshd and a real Docker engine.

Nothing can be pulled here, so the training image is made on the spot with `docker import` from
this machine's own files: this interpreter's tree, the test venv's packages and the system's shared
libraries. The engine is the machine's own when one answers; otherwise (as root, with dockerd
installed by `make system-packages`) the fixture starts one for the session, its storage under a
temporary directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cloudtune.cli import cli
from cloudtune.ledger import Ledger

from .processes import stop_process
from .test_ssh import SECRET_NAME, SECRET_VALUE, Watcher, assert_secret_in_no_file, ssh_recipe, start_cli, wait_for_log

# Packages the CPU training never imports (the GPU compiler stack), left out to keep the image small.
LEFT_OUT = ("triton", "nvidia")


def _docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, **kwargs)


def _engine_answers() -> bool:
    try:
        return _docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    if shutil.which("docker") is None:
        pytest.fail("the docker CLI is not installed: run `make system-packages` (apt-get install -y docker.io).")
    if _engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if os.geteuid() != 0 or not Path(dockerd).exists():
        pytest.fail("no Docker engine answers, and this user cannot start one (needs root and dockerd).")
    folder = tmp_path_factory.mktemp("dockerd")
    log = (folder / "dockerd.log").open("w")
    # No bridge network and no iptables: containers use the host's network, the sandbox allows nothing more.
    process = subprocess.Popen([dockerd, "--iptables=false", "--bridge=none", "--data-root", str(folder / "data"),
                                "--exec-root", str(folder / "exec"), "--pidfile", str(folder / "dockerd.pid")],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not _engine_answers():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"dockerd did not start:\n{(folder / 'dockerd.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield
    stop_process(process, grace_seconds=30)
    log.close()


def _image_members() -> list[tuple[Path, str]]:
    """(path here, path in the image): the interpreter, its packages at the interpreter's own
    site-packages, the shared libraries, and the few programs run.sh uses."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path(sysconfig.get_paths()["purelib"])
    image_site = base / "lib" / version / "site-packages"
    members = [(path, str(path)) for path in base.iterdir() if path.name != "lib"]
    members += [(path, str(path)) for path in (base / "lib").iterdir() if path.name != version]
    members += [(path, str(path)) for path in (base / "lib" / version).iterdir()
                if path.name not in ("site-packages", "test")]
    members += [(path, str(image_site / path.name)) for path in site.iterdir()
                if not path.name.startswith(LEFT_OUT) and path.name != "__editable__.cloudtune-0.1.0.pth"]
    libraries = Path("/usr/lib") / f"{os.uname().machine}-linux-gnu"
    members += [(libraries, str(libraries)), (Path("/usr/lib64"), "/usr/lib64")]
    members += [(Path("/usr/bin") / name, f"/usr/bin/{name}") for name in ("sh", "dash", "dirname", "env")]
    return members


@pytest.fixture(scope="session")
def train_image(docker_engine) -> str:
    """A pinned tag of an image with this machine's Python and the training packages."""
    members = _image_members()
    tag = "cloudtune-test-train:" + hashlib.sha256(repr(members).encode()).hexdigest()[:12]
    if _docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    path = f"{sys.base_prefix}/bin:/usr/bin:/bin"
    importer = subprocess.Popen(["docker", "import", "--change", f"ENV PATH={path}", "-", tag],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with tarfile.open(fileobj=importer.stdin, mode="w|") as archive:
        for name, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            archive.addfile(link)
        for name, mode in (("tmp", 0o1777), ("etc", 0o755)):
            folder = tarfile.TarInfo(name)
            folder.type, folder.mode = tarfile.DIRTYPE, mode
            archive.addfile(folder)
        for source, target in members:
            archive.add(source, arcname=target.lstrip("/"),
                        filter=lambda info: None if "__pycache__" in info.name else info)
    importer.stdin.close()
    output = importer.stdout.read().decode(errors="replace")
    if importer.wait() != 0:
        pytest.fail(f"docker import failed:\n{output[-2000:]}")
    return tag


def docker_recipe(folder: Path, image: str, max_steps: int, secrets: tuple[str, ...] = ()) -> Path:
    path = ssh_recipe(folder, max_steps=max_steps, secrets=secrets)
    data = yaml.safe_load(path.read_text())
    data.setdefault("compute", {}).update(remote_env="docker", image=image)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def docker_remote(remote: Path) -> Path:
    """The remote root, with the demo model cache inside it: a container sees only what is under the root."""
    (remote / "models").unlink()
    (remote / "models").mkdir()
    return remote


def _running_containers() -> list[str]:
    return _docker("ps", "--format", "{{.Names}}", check=False).stdout.split()


def test_train_in_a_docker_image_over_ssh(sshd, docker_remote, train_image, tmp_path, ct_home, monkeypatch):
    from cloudtune.recipe import load_recipe
    from cloudtune.train.model import model_source
    from cloudtune.train.verify import TOLERANCE, max_logit_difference

    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    steps = 12
    recipe_path = docker_recipe(tmp_path, train_image, max_steps=steps, secrets=(SECRET_NAME,))
    watcher = Watcher(docker_remote, sshd, containers=set())
    thread = threading.Thread(target=watcher.watch, daemon=True)
    thread.start()
    try:
        result = CliRunner(mix_stderr=False).invoke(cli, ["run", "--backend", "ssh", "--host", sshd.address(),
                                                          "--key", str(sshd.key), "--json", str(recipe_path)])
    finally:
        watcher.stop.set()
        thread.join()
    assert result.exit_code == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert receipt["steps"] == steps
    run = Ledger().get_run(receipt["run_id"])
    container = Ledger().machine_for_run(run["id"])["meta"]["container"]
    assert container in watcher.containers, "the training ran in its container"
    assert container not in _running_containers(), "and the container is gone afterwards"
    said = " ".join(result.stderr.split())  # rich wraps long lines to the terminal's width
    assert f"training in {train_image}" in said
    # The image has every package, so no venv was built over it.
    assert f"{train_image} already has the training packages" in said
    assert not (docker_remote / "envs").exists()

    out = Path(receipt["output_dir"])
    assert max_logit_difference(out, model_source(load_recipe(recipe_path))) <= TOLERANCE
    # The secret reached the containerised trainer through the private file, never a command line.
    assert watcher.secret_in_training_env
    assert not watcher.leaks, "the secret showed in `ps` (a `docker run -e` would)"
    assert SECRET_VALUE not in result.stdout + result.stderr
    assert_secret_in_no_file(ct_home, docker_remote, out)
    # Everything the container wrote belongs to the login user, so teardown could remove the run.
    assert not Path(Ledger().machine_for_run(run["id"])["meta"]["remote_dir"]).exists()


def test_down_stops_the_training_container(sshd, docker_remote, train_image, tmp_path, ct_home):
    recipe_path = docker_recipe(tmp_path, train_image, max_steps=100000)
    process = start_cli(["run", "--backend", "ssh", "--host", sshd.address(), "--key", str(sshd.key),
                         str(recipe_path)], tmp_path / "cli.log")
    wait_for_log(docker_remote, r"step 1/", timeout=180, process=process)  # steps print every 2000 from here
    os.killpg(process.pid, signal.SIGKILL)  # the CLI dies; the container trains on
    process.wait()
    run = Ledger().runs(1)[0]
    container = Ledger().machine_for_run(run["id"])["meta"]["container"]
    assert container in _running_containers()

    result = CliRunner().invoke(cli, ["down", run["id"], "--yes"])
    assert result.exit_code == 0 and "terminated" in result.output, result.output
    assert container not in _running_containers()
    deadline = time.time() + 30  # --rm removes a stopped container in the background
    while _docker("inspect", container, check=False).returncode == 0 and time.time() < deadline:
        time.sleep(0.5)
    assert _docker("inspect", container, check=False).returncode != 0, "the stopped container was removed"
    assert not Path(Ledger().machine_for_run(run["id"])["meta"]["remote_dir"]).exists()
    assert Ledger().get_run(run["id"])["status"] == "cancelled"


def test_an_image_without_python_is_a_clear_error(sshd, docker_remote, docker_engine, tmp_path):
    folder = tmp_path / "rootfs"
    (folder / "usr" / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/dash", folder / "usr" / "bin" / "sh")
    tag = "cloudtune-test-nopython:1"
    with tarfile.open(tmp_path / "rootfs.tar", "w") as archive:
        archive.add(folder, arcname=".")
    subprocess.run(["docker", "import", str(tmp_path / "rootfs.tar"), tag], check=True, capture_output=True)
    recipe_path = docker_recipe(tmp_path, tag, max_steps=2)
    result = subprocess.run([sys.executable, "-m", "cloudtune.cli", "run", "--backend", "ssh", "--host",
                             sshd.address(), "--key", str(sshd.key), str(recipe_path)], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the image {tag} could not run python3" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
