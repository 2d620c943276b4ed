"""What every call into SkyPilot's SDK shares, written once: its errors become one message with a hint,
its printing goes to stderr (so `--json` on stdout stays clean), the local API server cloudtune
starts is stopped again, and `sky check`'s verdict per cloud is read with the pip extra that adds it.

`SkyClient` (backends/skypilot.py) is decorated with `sdk_calls`; sky is imported inside functions.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import CloudtuneError

# cloudtune's pip extras, each one SkyPilot extra of the same name (pyproject.toml; a test holds them
# to SkyPilot 0.14.1's own list). Plain `skypilot` can reach Lambda only.
CLOUD_EXTRAS = ("aws", "gcp", "azure", "runpod", "lambda", "vast", "nebius", "fluidstack", "slurm")
ALL_CLOUDS_EXTRA = "all-clouds"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def install_hint(cloud: str | None = None) -> str:
    extra = cloud if cloud in CLOUD_EXTRAS else ALL_CLOUDS_EXTRA
    return f"pip install 'cloudtune[{extra}]'"


# ----------------------------------------------------------------------------------------------
# errors


def _raised_in_sky(exc: BaseException) -> bool:
    """A SkyPilot exception, or anything raised from inside SkyPilot's code (requests, psutil, ...)."""
    sky = sys.modules.get("sky")
    if sky is None:  # not imported yet: nothing of SkyPilot's ran
        return False
    if type(exc).__module__.split(".")[0] == "sky":
        return True
    root = str(Path(sky.__file__).parent)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(root):
            return True
        tb = tb.tb_next
    return False


def _message(exc: BaseException, limit: int = 1500) -> str:
    text = _ANSI.sub("", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def translate(call: str, exc: Exception) -> CloudtuneError:
    """SkyPilot's exception as one message and a hint, by what the user can do about it."""
    from sky import exceptions

    server = (exceptions.ApiServerConnectionError, exceptions.APIVersionMismatchError,
              exceptions.ApiServerAuthenticationError)
    if isinstance(exc, exceptions.NoCloudAccessError):
        return CloudtuneError("SkyPilot has no cloud credentials set up.",
                              f"`cloudtune check` shows what each cloud is missing; {install_hint()} adds every "
                              "cloud's libraries.")
    if isinstance(exc, exceptions.ResourcesUnavailableError):
        return CloudtuneError(f"no offer in the plan could be provisioned: {_message(exc)}",
                              "Capacity comes and goes: retry later, or widen the plan (no --gpu, more clouds).")
    if isinstance(exc, server) or (isinstance(exc, OSError) and "connect" in str(exc).lower()):
        return CloudtuneError(f"cannot reach SkyPilot's API server ({call}): {_message(exc, 500)}",
                              "`sky api status` shows the server, `sky api stop` stops a stuck local one; "
                              "`cloudtune check` says which clouds it can use.")
    if isinstance(exc, exceptions.ClusterDoesNotExist):
        return CloudtuneError(f"SkyPilot {call}: no such cluster (any more): {_message(exc, 500)}",
                              "`sky status` lists the clusters there are; `cloudtune status` the runs.")
    if isinstance(exc, exceptions.ClusterNotUpError):
        return CloudtuneError(f"SkyPilot {call}: the cluster is not up: {_message(exc, 500)}",
                              "`sky status` shows it; `cloudtune down` removes what cloudtune started.")
    if isinstance(exc, exceptions.NotSupportedError):
        return CloudtuneError(f"SkyPilot {call}: not supported there: {_message(exc)}",
                              "`cloudtune cost` leaves out clouds that lack what a plan needs; pass --cloud to "
                              "choose another.")
    return CloudtuneError(f"SkyPilot {call} failed: {type(exc).__name__}: {_message(exc)}",
                          "SkyPilot's output above says more; `cloudtune --debug ...` shows the traceback.")


# ----------------------------------------------------------------------------------------------
# output


@contextlib.contextmanager
def output_to_stderr() -> Iterator[None]:
    """SkyPilot prints progress and log lines to stdout (its logger holds sys.stdout from import
    time): send both to stderr for the call."""
    handlers = [h for h in logging.getLogger("sky").handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    for handler in handlers:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)


# ----------------------------------------------------------------------------------------------
# the decorator


@contextlib.contextmanager
def _sky_call(call: str) -> Iterator[None]:
    try:
        with output_to_stderr():
            yield
    except CloudtuneError:
        raise
    except Exception as exc:
        if not _raised_in_sky(exc):
            raise
        raise translate(call, exc) from exc


def _wrap(name: str, method: Callable) -> Callable:
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, *args, **kwargs):
            with _sky_call(name):
                self.server.ensure()
            lines = method(self, *args, **kwargs)
            while True:
                with _sky_call(name):
                    try:
                        line = next(lines)
                    except StopIteration:
                        return
                yield line
        return stream

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with _sky_call(name):
            self.server.ensure()
            return method(self, *args, **kwargs)
    return call


def sdk_calls(cls: type) -> type:
    """Every public method of the class (whose `server` is a LocalServer): the local API server started
    when needed and remembered, SkyPilot's exceptions translated, its printing on stderr (for a
    generator, around each line it yields, not while the caller handles the line)."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(method):
            setattr(cls, name, _wrap(name, method))
    return cls


# ----------------------------------------------------------------------------------------------
# the local API server


class LocalServer:
    """SkyPilot's local API server, started by cloudtune only when none answers, and stopped again when
    cloudtune exits unless another client is using it."""

    def __init__(self) -> None:
        self.started = False
        self.checked = False

    def ensure(self) -> None:
        """Start the local server when none answers (what every SDK call would do), remembering it."""
        if self.checked:
            return
        from sky.server import common as server_common

        if not server_common.is_api_server_local() or \
                server_common.get_api_server_status().status != server_common.ApiServerStatus.UNHEALTHY:
            self.checked = True  # remote, or already up: not ours to stop
            return
        try:
            server_common.check_server_healthy_or_start_fn()
        except Exception as exc:  # noqa: BLE001 - SkyPilot raises RuntimeError, its own errors or requests'
            raise CloudtuneError(f"cannot start SkyPilot's local API server: {_message(exc, 500)}",
                                 "`sky api start` starts it by hand and says why it fails; `sky api status` shows "
                                 "a running one.") from exc
        self.started = self.checked = True
        atexit.register(self.release)

    def release(self) -> None:
        """Stop the server this process started, unless other requests are in flight on it."""
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(ValueError, OSError):  # at interpreter exit stderr may be closed already
            self._stop_unless_used()

    def _stop_unless_used(self) -> None:
        from sky.client import sdk
        from sky.server import daemons

        daemon_ids = {daemon.id for daemon in daemons.INTERNAL_REQUEST_DAEMONS}
        with output_to_stderr():
            try:
                others = [r.name for r in sdk.api_status() if r.request_id not in daemon_ids
                          and r.status in ("PENDING", "RUNNING")]
            except Exception as exc:  # noqa: BLE001 - at exit, say it and leave the server be
                others = [f"unknown: {type(exc).__name__}"]
            if others:
                sys.stderr.write(f"SkyPilot's API server, which cloudtune started, is left running: it still serves "
                                 f"{len(others)} request(s) ({', '.join(others[:3])}). `sky api stop` stops it.\n")
                return
            with contextlib.suppress(Exception):  # at exit: a server that is gone already is what we wanted
                sdk.api_stop()


def server_info(server: LocalServer) -> dict[str, Any]:
    """Where the API server runs, whether it answers, and whether cloudtune started it."""
    from sky.server import common as server_common

    local = server_common.is_api_server_local()
    status = server_common.get_api_server_status().status
    return {"url": server_common.get_server_url(), "local": local, "healthy": str(status.value) == "healthy",
            "started_by_cloudtune": server.started,
            "stop": "stopped when cloudtune exits (it started it)" if server.started else
            ("`sky api stop` stops it" if local else "a remote server: its operator runs it")}


# ----------------------------------------------------------------------------------------------
# sky check


def parse_check(text: str) -> dict[str, str]:
    """cloud (lower case) -> the reason `sky check` printed for it, from its output.

    SkyPilot 0.14.1 prints `  AWS: disabled` then indented `Reason [compute]: ...` lines
    (sky/check.py `_print_checked_cloud`).
    """
    reasons: dict[str, list[str]] = {}
    current: str | None = None
    for raw in _ANSI.sub("", text).splitlines():
        header = re.match(r"^ {2}(\S[^:]*): (enabled|disabled)\b", raw)
        if header:
            current = header.group(1).strip().lower()
            reasons[current] = []
        elif current is not None and raw.startswith("    ") and raw.strip():
            line = re.sub(r"^(Reason|Hint) \[[^]]*\]: ", "", raw.strip())
            reasons[current].append(line)
        elif not raw.strip():
            current = None
    return {cloud: " ".join(lines) for cloud, lines in reasons.items()}


def cloud_report(enabled: list[str], reasons: dict[str, str], clouds: list[str]) -> dict[str, dict[str, Any]]:
    """Per cloud: enabled or not, what SkyPilot says is missing, and the pip extra that adds its libraries."""
    report = {}
    unchecked = "SkyPilot did not check it: not in allowed_clouds of ~/.sky/config.yaml"
    for cloud in sorted(set(clouds) | set(enabled)):
        on = cloud in enabled
        report[cloud] = {"enabled": on, "missing": None if on else reasons.get(cloud) or unchecked,
                         "extra": install_hint(cloud) if cloud in CLOUD_EXTRAS else None}
    return report
