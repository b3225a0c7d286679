"""The control socket: one JSON request per line in, one JSON reply per line out.

A Unix socket (mode 0600, so root only) that the manager CLI and the REST API use to ask the
daemon for status and to apply, roll back, revert or restore skins. Replies are
``{"ok": true, "vms": {...}, ...}`` or ``{"ok": false, "error": "<one line>", "code": N}`` where
``code`` is the CLI exit code the error means (1 user error, 2 the daemon failed, 3 not in
force); a refusal may carry ``vms`` (the VMs' state after it) and ``internal: true`` (a bug in
the daemon, not a refusal). The client half is synchronous so the CLI needs no event loop.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Awaitable, Callable

import trio

log = logging.getLogger("netskin.control")

MAX_REQUEST_BYTES = 1 << 20
UNIT = "netskin-interceptor.service"


class ControlError(Exception):
    """A request the daemon refused; ``code`` is the CLI exit code (1 user error, 3 not in force).

    Raised by the daemon's handlers with ``vms`` (the state to report) where it helps; raised by
    ``request`` with ``internal`` (the daemon failed, it did not refuse) and the whole ``reply``.
    """

    def __init__(self, message: str, code: int = 1, vms: dict | None = None, *,
                 internal: bool = False, reply: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.vms = vms
        self.internal = internal
        self.reply = reply if reply is not None else {}


class DaemonUnreachable(Exception):
    """No daemon, or no reply from it: nothing is known about the request's effect."""


class ReplyTimeout(DaemonUnreachable):
    """The request was sent but no reply came within the timeout: it may still take effect."""


Handler = Callable[[dict], Awaitable[dict]]


# --- server half (the daemon) ------------------------------------------------------------------


async def serve(path: Path, handle: Handler, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale socket from a killed run
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _serve_one(stream, handle), [listener])
    finally:
        with trio.CancelScope(shield=True):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


async def _serve_one(stream: trio.SocketStream, handle: Handler) -> None:
    buffer = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > MAX_REQUEST_BYTES:
                await _send(stream, {"ok": False, "error": "request too large", "code": 1})
                return
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                await _send(stream, await _dispatch(line, handle))


async def _dispatch(line: bytes, handle: Handler) -> dict:
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or "cmd" not in request:
            raise ValueError("a request is a JSON object with a 'cmd'")
    except ValueError as exc:
        return {"ok": False, "error": f"bad request: {exc}", "code": 1}
    try:
        reply = await handle(request)
    except ControlError as exc:
        refused = {"ok": False, "error": str(exc), "code": exc.code}
        if exc.vms is not None:
            refused["vms"] = exc.vms
        return refused
    except Exception as exc:  # a bug must not take the data path down with it
        log.exception("control request %r failed", request.get("cmd"))
        return {"ok": False, "error": f"internal error: {exc!r}", "code": 2, "internal": True}
    return {"ok": True, **reply}


async def _send(stream: trio.SocketStream, reply: dict) -> None:
    try:
        await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# --- client half (CLI, API) --------------------------------------------------------------------


def request(path: Path, cmd: str, timeout: float = 10.0, **args) -> dict:
    """Send one request and return the reply's fields; raise on refusal or no daemon.

    ``timeout`` bounds the whole exchange. ``ReplyTimeout`` means the request went out and may
    still take effect; other ``DaemonUnreachable`` errors mean it never reached a daemon.
    """
    deadline = time.monotonic() + timeout
    sent = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            sent = True
            data = b""
            while not data.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnreachable(
            f"the netskin daemon is not running (no control socket at {path}): start it with "
            f"'systemctl start {UNIT}' or 'netskin-interceptor --config CONFIG'"
        ) from exc
    except PermissionError as exc:
        raise DaemonUnreachable(
            f"no permission to use the netskin daemon's control socket {path}: run netskin as root"
        ) from exc
    except TimeoutError as exc:  # socket.timeout is TimeoutError
        if sent:
            raise ReplyTimeout(
                f"the netskin daemon at {path} did not answer {cmd!r} within {timeout:g} s"
            ) from exc
        raise DaemonUnreachable(f"the netskin daemon at {path} did not accept the request within "
                                f"{timeout:g} s") from exc
    except OSError as exc:
        raise DaemonUnreachable(f"the netskin daemon at {path} did not answer: {exc}") from exc
    if not data:
        raise DaemonUnreachable(f"the netskin daemon at {path} closed the connection without a reply")
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise DaemonUnreachable(f"the netskin daemon at {path} sent an unreadable reply: {exc}") from exc
    if not isinstance(reply, dict):
        raise DaemonUnreachable(f"the netskin daemon at {path} sent an unreadable reply: {data[:80]!r}")
    if not reply.get("ok", False):
        raise ControlError(reply.get("error", "refused"), reply.get("code", 1), reply.get("vms"),
                           internal=bool(reply.get("internal", False)), reply=reply)
    del reply["ok"]
    return reply
