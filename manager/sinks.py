"""The demo lab's traffic sinks: UDP/TCP echo and two small authoritative DNS servers.

Runs as one process inside the lab's "internet" namespace (``manager.lab`` starts it with
``ip netns exec``) and stops cleanly on SIGTERM or SIGINT. Answering DNS is a pure function
(``dns_answer``) so it can be tested without sockets; the trio tasks below only move bytes.

    python -m manager.sinks --echo 10.77.0.2:9000 --dns primary@10.77.0.2:53 --dns secondary@10.77.0.3:53
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from functools import partial

import trio
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

log = logging.getLogger("netskin.sinks")

DOMAIN = "example.test."
TTL_S = 60
UDP_MAX_BYTES = 65535


@dataclass(frozen=True)
class Zone:
    """What one lab DNS server answers: www.example.test, a wildcard below it, NXDOMAIN else.

    The two servers differ only in the www address, so a test can tell which one answered.
    """

    name: str
    www_a: str
    www_aaaa: str
    other_a: str = "192.0.2.20"
    other_aaaa: str = "2001:db8::20"


ZONES = {
    "primary": Zone("primary", www_a="192.0.2.10", www_aaaa="2001:db8::10"),
    "secondary": Zone("secondary", www_a="192.0.2.99", www_aaaa="2001:db8::99"),
}


def dns_answer(query: bytes, zone: Zone) -> bytes | None:
    """The reply to one DNS message, or None when it is not a DNS query worth answering."""
    try:
        request = DNSRecord.parse(query)
    except (DNSError, struct.error, IndexError, ValueError):
        return None
    if request.header.qr or not request.questions:
        return None
    reply = request.reply(ra=1, aa=1)  # aa: this is the zone's authority; ra: keeps dig quiet
    question = request.q
    qname = str(question.qname).lower()
    if qname == "www." + DOMAIN:
        a, aaaa = zone.www_a, zone.www_aaaa
    elif qname.endswith("." + DOMAIN):
        a, aaaa = zone.other_a, zone.other_aaaa
    elif qname == DOMAIN:
        return reply.pack()  # the apex exists but holds no address: NOERROR, no answer
    else:
        reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack()
    if question.qtype in (QTYPE.A, QTYPE.ANY):
        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(a), ttl=TTL_S))
    if question.qtype in (QTYPE.AAAA, QTYPE.ANY):
        reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(aaaa), ttl=TTL_S))
    return reply.pack()


# --- the trio shell -------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


async def _udp_socket(host: str, port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    return sock


async def _tcp_listener(host: str, port: int) -> trio.SocketListener:
    sock = trio.socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    sock.listen(128)
    return trio.SocketListener(sock)


async def _udp_echo(sock: trio.socket.SocketType) -> None:
    while True:
        payload, peer = await sock.recvfrom(UDP_MAX_BYTES)
        await _udp_send(sock, payload, peer)


async def _udp_send(sock: trio.socket.SocketType, payload: bytes, peer) -> None:
    try:
        await sock.sendto(payload, peer)
    except OSError as exc:
        # A peer that vanished, or a skin that rejects our reply, must not stop the server.
        if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPERM):
            raise
        log.debug("udp reply to %s failed: %s", peer, exc)


async def _tcp_echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _udp_dns(sock: trio.socket.SocketType, zone: Zone) -> None:
    while True:
        query, peer = await sock.recvfrom(UDP_MAX_BYTES)
        reply = dns_answer(query, zone)
        if reply is not None:
            await _udp_send(sock, reply, peer)


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def _tcp_dns(stream: trio.SocketStream, zone: Zone) -> None:
    """DNS over TCP: each message is prefixed by its two-byte length (RFC 1035 4.2.2)."""
    try:
        async with stream:
            while (prefix := await _receive_exactly(stream, 2)) is not None:
                query = await _receive_exactly(stream, struct.unpack("!H", prefix)[0])
                if query is None:
                    return
                reply = dns_answer(query, zone)
                if reply is None:
                    return
                await stream.send_all(struct.pack("!H", len(reply)) + reply)
    except trio.BrokenResourceError:
        pass


def _host_port(spec: str) -> tuple[str, int]:
    """'10.77.0.2:9000' or '[fd77::2]:9000'."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{spec!r}: expected ADDRESS:PORT, e.g. 10.77.0.2:9000")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: {host!r} is not an IP address") from None
    return host, int(port)


def _dns_spec(spec: str) -> tuple[Zone, str, int]:
    """'primary@10.77.0.2:53'."""
    zone_name, sep, rest = spec.partition("@")
    if not sep or zone_name not in ZONES:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected ZONE@ADDRESS:PORT with ZONE one of {sorted(ZONES)}")
    return (ZONES[zone_name], *_host_port(rest))


async def serve(echo: list[tuple[str, int]], dns: list[tuple[Zone, str, int]]) -> None:
    """Serve until SIGTERM/SIGINT. Binding everything before serving makes a bind error fatal."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for host, port in echo:
                nursery.start_soon(_udp_echo, await _udp_socket(host, port))
                nursery.start_soon(trio.serve_listeners, _tcp_echo, [await _tcp_listener(host, port)])
            for zone, host, port in dns:
                nursery.start_soon(_udp_dns, await _udp_socket(host, port), zone)
                handler = partial(_tcp_dns, zone=zone)
                nursery.start_soon(trio.serve_listeners, handler, [await _tcp_listener(host, port)])
            log.info("serving echo on %s and dns on %s", echo, [(z.name, h, p) for z, h, p in dns])
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manager.sinks", description=__doc__.splitlines()[0])
    parser.add_argument("--echo", type=_host_port, action="append", default=[], metavar="ADDR:PORT",
                        help="UDP and TCP echo on this address and port (repeatable)")
    parser.add_argument("--dns", type=_dns_spec, action="append", default=[], metavar="ZONE@ADDR:PORT",
                        help=f"DNS over UDP and TCP answering zone ZONE ({', '.join(ZONES)}) (repeatable)")
    args = parser.parse_args(argv)
    if not args.echo and not args.dns:
        parser.error("nothing to serve: give at least one --echo or --dns")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(serve, args.echo, args.dns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
