"""A page opened in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

Chromium speaks the protocol on file descriptors 3 (commands in) and 4 (replies and events out) with
--remote-debugging-pipe: JSON messages each ended by a NUL byte, so no port and no websocket library.
What the page logs is collected from the Runtime domain (console calls, uncaught exceptions) and the Log
domain (the browser's own complaints: a resource that failed to load, a blocked request).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LOAD_TIMEOUT_S = 60


@dataclass
class Rendered:
    png: bytes
    errors: list[str] = field(default_factory=list)  # console errors, exceptions and error log entries
    values: dict = field(default_factory=dict)  # what each expression asked for evaluated to after loading


class _Pipe:
    def __init__(self, commands: int, replies: int):
        self.commands, self.replies, self.buffer, self.next_id = commands, replies, b"", 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def receive(self, timeout: float = LOAD_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed its DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method: str) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self.receive())


def _errors(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            said = (str(arg.get("value", arg.get("description"))) for arg in params["args"])
            found.append("console: " + " ".join(said))
        elif event.get("method") == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
    return found


def render(page: Path, width: int, height: int, evaluate: dict[str, str] | None = None) -> Rendered:
    """Open `page` at width x height CSS pixels, wait for its load event, screenshot the viewport."""
    commands_read, commands_write = os.pipe()
    replies_read, replies_write = os.pipe()

    def onto_3_and_4() -> None:  # via descriptors above 10, so neither move can overwrite the other
        commands = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
        replies = fcntl.fcntl(replies_write, fcntl.F_DUPFD, 10)
        os.dup2(commands, 3)
        os.dup2(replies, 4)

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
         "--no-default-browser-check", f"--user-data-dir={profile}", f"--window-size={width},{height}",
         "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(3, 4),
        preexec_fn=onto_3_and_4)
    os.close(commands_read)
    os.close(replies_write)
    pipe = _Pipe(commands_write, replies_read)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        pipe.events.clear()  # what about:blank said is not the page's
        pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        pipe.wait_for("Page.loadEventFired")
        values = {name: pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                  session=session)["result"].get("value")
                  for name, expression in (evaluate or {}).items()}
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        return Rendered(png=base64.b64decode(shot), errors=_errors(pipe.events), values=values)
    finally:
        try:
            pipe.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        os.close(commands_write)
        os.close(replies_read)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)
