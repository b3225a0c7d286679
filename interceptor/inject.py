"""Packets the daemon sends itself: the ICMP errors a router with the skin's MTU would send.

Raw ICMP sockets in the daemon's namespace; the kernel picks the source address by route (as a
router answering from its interface would) and, for ICMPv6, computes the checksum. Sending never
raises into the data path: a failure is counted and logged once.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("netskin.inject")


class Injector:
    def __init__(self) -> None:
        self._sockets: dict[int, socket.socket] = {}
        self.sent = 0
        self.failed = 0

    def _socket(self, version: int) -> socket.socket:
        sock = self._sockets.get(version)
        if sock is None:
            if version == 4:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            else:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            sock.setblocking(False)
            self._sockets[version] = sock
        return sock

    def send_icmp(self, version: int, destination: bytes, message: bytes) -> None:
        try:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            self._socket(version).sendto(message, (socket.inet_ntop(family, destination), 0))
            self.sent += 1
        except OSError as exc:
            if not self.failed:
                log.warning("could not send an ICMP error: %s", exc)
            self.failed += 1

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
