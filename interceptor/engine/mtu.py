"""The MTU stage: the path behaves like a router whose next hop has the skin's MTU.

Most of it is the kernel's job: netskin sets the MTU on the VM's interface (when it can reach
it) and on the host-side device, and the kernel then fragments or answers "fragmentation
needed" for forwarded traffic. This stage covers what reaches the engine anyway (a VM whose
interface the host cannot change, traffic the kernel did not check): a packet larger than the
MTU that may not be fragmented (IPv4 with DF, every IPv6 packet) is dropped and its sender gets
the ICMP error that makes path MTU discovery work. Building the error is pure; sending it is
the shell's.
"""

from __future__ import annotations

from struct import pack

from interceptor.packet import MALFORMED, PROTO_ICMP, PROTO_ICMPV6, Header, internet_checksum

ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMPV6_PACKET_TOO_BIG = 2
IPV6_MIN_MTU = 1280

# ICMP errors quote the offending packet: IPv4 routers send its header plus 8 bytes (RFC 792);
# IPv6 as much as fits in the minimum MTU (RFC 4443 §2.4).
_QUOTE_V4 = 28
_QUOTE_V6 = IPV6_MIN_MTU - 40 - 8

# Never answer an ICMP error with an ICMP error (RFC 1122 §3.2.2, RFC 4443 §2.4).
_ICMP_ERRORS_V4 = frozenset({3, 4, 5, 11, 12})
_ICMP_ERRORS_V6 = frozenset({1, 2, 3, 4})


def too_big(header: Header, mtu: int) -> bool:
    """Whether this packet exceeds ``mtu`` and may not be fragmented on the way."""
    return header.length > mtu and header.proto != MALFORMED and header.dont_fragment


def icmp_error(packet: bytes, header: Header, mtu: int) -> tuple[int, bytes, bytes] | None:
    """The "fragmentation needed" / "packet too big" message for ``packet``: (IP version,
    destination address, ICMP message), or None when no error may be sent for it.

    The message goes to the packet's sender. For IPv4 the checksum is filled in here; for IPv6
    the kernel computes it (raw ICMPv6 sockets always do, since it covers the pseudo-header).
    """
    if header.proto == MALFORMED:
        return None
    if header.version == 4:
        if header.proto == PROTO_ICMP and header.sport in _ICMP_ERRORS_V4:
            return None
        if not header.first_fragment:
            return None
        quote = packet[:_QUOTE_V4 if header.l4_offset <= 20 else header.l4_offset + 8]
        body = pack("!BBHHH", ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, mtu & 0xFFFF) + quote
        csum = internet_checksum(body)
        return 4, header.src, body[:2] + pack("!H", csum) + body[4:]
    if header.version == 6:
        if header.proto == PROTO_ICMPV6 and header.sport in _ICMP_ERRORS_V6:
            return None
        body = pack("!BBHI", ICMPV6_PACKET_TOO_BIG, 0, 0, max(mtu, IPV6_MIN_MTU)) + packet[:_QUOTE_V6]
        return 6, header.src, body
    return None
