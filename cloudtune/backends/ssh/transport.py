"""Getting onto the machine: addresses, host keys, the connection, and getting it back when it drops.

paramiko is imported here and in no other module of cloudtune. Host keys are checked against
known_hosts and a changed key is never accepted; a host not yet known is refused unless the user said
to trust it, and then recorded.
"""
from __future__ import annotations

import getpass
import os
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko

from ...errors import CloudtuneError

KNOWN_HOSTS_ENV = "CLOUDTUNE_KNOWN_HOSTS"
CONNECT_TIMEOUT = 15
KEEPALIVE_SECONDS = 15
TRANSFER_ATTEMPTS = 3
T = TypeVar("T")


class Unreachable(CloudtuneError):
    """The machine did not answer: worth retrying, unlike a refused key or a changed host key."""


def parse_host(text: str) -> tuple[str, str, int]:
    """`user@host[:port]` (also `ssh://...` and `[ipv6]:port`) -> (user, host, port)."""
    spec = text.strip().removeprefix("ssh://")
    user, _, hostport = spec.rpartition("@")
    port = ""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host = hostport
    if not host or (port and not port.isdigit()) or not 0 < int(port or 22) < 65536 or "/" in host:
        raise CloudtuneError(f"--host '{text}' is not an SSH address.", "Write it as user@ip or user@ip:port.")
    return user or getpass.getuser(), host, int(port or 22)


def known_hosts_path(path: str | Path | None = None) -> Path:
    chosen = path or os.environ.get(KNOWN_HOSTS_ENV) or Path.home() / ".ssh" / "known_hosts"
    return Path(chosen).expanduser().resolve()


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


@dataclass(frozen=True)
class Target:
    """Where to log in, and how the host key is to be checked."""

    user: str
    host: str
    port: int
    key: str | None
    known_hosts: Path
    trust_new_host: bool = False

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown hosts are refused unless the user said to trust them; trusted ones are appended to known_hosts."""

    def __init__(self, known_hosts: Path, trust_new_host: bool, note: Callable[[str], None]):
        self.known_hosts = known_hosts
        self.trust_new_host = trust_new_host
        self.note = note

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust_new_host:
            raise CloudtuneError(
                f"{hostname} is not in {self.known_hosts}: its host key ({key.get_name()} {key.fingerprint}) "
                "cannot be checked, so cloudtune will not connect.",
                "If that fingerprint is the machine's (ask its provider, or run `ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub` on it), run again with --trust-new-host to record it.")
        self._record(hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.note(f"trusted new host {hostname} ({key.get_name()} {key.fingerprint}); recorded in {self.known_hosts}")

    def _record(self, hostname: str, key: paramiko.PKey) -> None:
        # Appended rather than rewritten, so the user's comments and other entries stay as they were.
        try:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            existing = self.known_hosts.read_bytes() if self.known_hosts.exists() else b""
            with self.known_hosts.open("a") as handle:
                if existing and not existing.endswith(b"\n"):
                    handle.write("\n")
                handle.write(paramiko.hostkeys.HostKeyEntry([hostname], key).to_line())
        except OSError as exc:
            raise CloudtuneError(f"cannot record {hostname}'s host key in {self.known_hosts} ({exc.strerror}).",
                                 f"Make that file writable, or point {KNOWN_HOSTS_ENV} at one that is.") from None


def connect(target: Target, note: Callable[[str], None] = lambda message: None) -> paramiko.SSHClient:
    """An authenticated client, or a CloudtuneError that says what to fix."""
    if target.key and not Path(target.key).is_file():
        raise CloudtuneError(f"--key {target.key}: no such file.", "Give the path of the private key for this machine.")
    client = paramiko.SSHClient()
    if target.known_hosts.is_file():
        client.load_host_keys(str(target.known_hosts))
    client.set_missing_host_key_policy(HostKeyPolicy(target.known_hosts, target.trust_new_host, note))
    try:
        client.connect(target.host, port=target.port, username=target.user, key_filename=target.key,
                       allow_agent=True, look_for_keys=not target.key, timeout=CONNECT_TIMEOUT,
                       banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT)
    except BaseException as exc:
        client.close()
        if isinstance(exc, CloudtuneError | KeyboardInterrupt):
            raise
        raise connect_error(exc, target) from None
    client.get_transport().set_keepalive(KEEPALIVE_SECONDS)
    return client


def connect_error(exc: BaseException, target: Target) -> CloudtuneError:
    """What a failed connect means for the user: the host key, the login, or the network."""
    if isinstance(exc, paramiko.BadHostKeyException):
        name = host_key_name(target.host, target.port)
        return CloudtuneError(
            f"the host key of {name} has CHANGED: it now presents {exc.key.get_name()} {exc.key.fingerprint}, "
            f"but {target.known_hosts} records {exc.expected_key.get_name()} {exc.expected_key.fingerprint}. "
            "Someone may be intercepting the connection, or the machine was reinstalled; cloudtune never accepts "
            "a changed key.",
            f"Only if you know the machine was rebuilt: `ssh-keygen -R '{name}' -f {target.known_hosts}`, then run "
            "again with --trust-new-host.")
    if isinstance(exc, paramiko.PasswordRequiredException):
        return CloudtuneError(f"the key {target.key} is protected by a passphrase, which cloudtune does not ask for.",
                              f"Load it into ssh-agent (`ssh-add {target.key}`) and run without --key.")
    if isinstance(exc, paramiko.AuthenticationException):
        tried = f"the key {target.key}" if target.key else "ssh-agent and ~/.ssh/id_* keys"
        return CloudtuneError(f"{target.where} refused the login with {tried} ({exc}).",
                              "Check the user name, and that the key's public half is in ~/.ssh/authorized_keys "
                              "on the machine; choose the key with --key PATH.")
    return _network_error(exc, target)


def _network_error(exc: BaseException, target: Target) -> CloudtuneError:
    host, port, key = target.host, target.port, target.key
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Unreachable(f"cannot reach {host}:{port}: no answer within {CONNECT_TIMEOUT} s.",
                           "Check the address and port, that the machine is running and that its firewall "
                           "lets SSH in.")
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError) and exc.errors:
        exc = next(iter(exc.errors.values()))  # the socket error behind "unable to connect"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach {host}:{port} ({reason}).",
                           "Check the address and port (user@ip:port), that the machine is running and that "
                           "its firewall lets SSH in.")
    if key and isinstance(exc, (paramiko.SSHException, ValueError)) and "key" in str(exc).lower():
        return CloudtuneError(f"--key {key} is not a private key cloudtune can use ({exc}).",
                              "Give the private half (not the .pub) of an OpenSSH, PEM or PuTTY-converted key.")
    if isinstance(exc, (paramiko.SSHException, ValueError)):
        return CloudtuneError(f"SSH to {target.where} failed: {exc or type(exc).__name__}.",
                              "`ssh -v` to the same address shows more of what went wrong.")
    return CloudtuneError(f"SSH to {target.where} failed: {type(exc).__name__}: {exc}.")


class Connection:
    """One machine's SSH connection and SFTP session, opened on first use and again after a drop."""

    def __init__(self, target: Target, warn: Callable[[str], None]):
        self.target = target
        self.warn = warn
        self.client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def where(self) -> str:
        return self.target.where

    def ssh(self) -> paramiko.SSHClient:
        if self.active():
            return self.client
        if self.client is not None:
            self.warn(f"connection to {self.target.host} lost; reconnecting")
        self.close()
        self.client = connect(self.target, self.warn)
        return self.client

    def active(self) -> bool:
        transport = self.client.get_transport() if self.client else None
        return transport is not None and transport.is_active()

    def files(self) -> paramiko.SFTPClient:
        if self._sftp is None or not self.active():
            self._sftp = self.ssh().open_sftp()
        return self._sftp

    def close(self) -> None:
        for handle in (self._sftp, self.client):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 - a dead connection may fail to close; it is gone either way
                    pass
        self._sftp = self.client = None

    def lost(self, exc: BaseException) -> bool:
        """Did this error come from the connection dropping (as opposed to the machine saying no)?"""
        if isinstance(exc, CloudtuneError):
            return isinstance(exc, Unreachable)
        if isinstance(exc, (EOFError, paramiko.SSHException, ConnectionError, socket.timeout)):
            return True
        return isinstance(exc, OSError) and not self.active()

    def retrying(self, what: str, action: Callable[[], T]) -> T:
        """Run action; when the connection drops, reconnect and run it again (it must be resumable)."""
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            try:
                return action()
            except Exception as exc:
                if not self.lost(exc):
                    raise
                self.close()
                if attempt == TRANSFER_ATTEMPTS:
                    raise CloudtuneError(f"lost the connection to {self.where} while {what} ({exc or 'EOF'}).",
                                         "Run again: finished work is kept and transfers resume.") from None
                self.warn(f"connection to {self.target.host} lost while {what}; reconnecting")
                time.sleep(attempt)
        raise AssertionError("unreachable")

    def run(self, command: str, *, check: bool = True, on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
        """Run a POSIX sh command line (see commands.py) on the machine, whatever the login shell is;
        stdout and stderr together."""
        channel = self.ssh().get_transport().open_session(timeout=CONNECT_TIMEOUT)
        with channel:
            channel.set_combine_stderr(True)
            channel.exec_command("/bin/sh -c " + shlex.quote(command))
            lines = []
            for raw in channel.makefile("rb"):
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            code = channel.recv_exit_status()
        if code == -1:  # the channel closed without an exit status: the connection went away
            raise EOFError("the connection closed before the command finished")
        if check and code != 0:
            tail = "\n".join(lines[-15:])
            raise CloudtuneError(f"a command failed on {self.where} (exit {code}):\n{tail}")
        return code, "\n".join(lines)
