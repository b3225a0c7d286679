"""sd_notify(3) without libsystemd: tell the service manager that the daemon is ready, alive, or
stopping. One datagram of newline-separated ``KEY=VALUE`` fields to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading '@' names a Linux abstract socket). Outside systemd there is no
$NOTIFY_SOCKET and every call is a no-op returning False, so the daemon runs the same anywhere.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("netskin.sdnotify")


def _address(name: str) -> str:
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    # systemd 254+ may also hand out "vsock:CID:PORT"; no host netskin supports needs it.
    raise ValueError(f"NOTIFY_SOCKET={name!r}: only a path or an abstract '@name' is supported")


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1", "STATUS=...") to the service manager in one message.

    False when not started by a service manager that listens (no $NOTIFY_SOCKET), or when the
    message could not be delivered (logged: the daemon keeps running either way).
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    for field in fields:
        if "=" not in field or "\n" in field:
            raise ValueError(f"sd_notify field {field!r} is not one KEY=VALUE line")
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _address(name))
    except OSError as exc:
        log.warning("sd_notify to %s failed (%s): %s", name, exc, message.decode(errors="replace"))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The service's watchdog timeout (WatchdogSec=) in seconds, or None when there is none or it
    is meant for another process (WATCHDOG_PID names a different pid). Send "WATCHDOG=1" at about
    half this interval: systemd kills the service when one interval passes without it."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            raise ValueError(f"WATCHDOG_PID={pid!r} is not a process id") from None
    try:
        interval_us = int(usec)
    except ValueError:
        raise ValueError(f"WATCHDOG_USEC={usec!r} is not a number of microseconds") from None
    if interval_us <= 0:
        return None
    return interval_us / 1_000_000
