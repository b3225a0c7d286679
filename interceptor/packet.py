"""Header parsing for the hot path: IPv4/IPv6 and the TCP/UDP/ICMP ports or types.

Fixed-offset ``struct`` reads only (no scapy, no copies beyond the payload bytes NFQUEUE hands
over). Anything truncated or malformed parses to a header with ``proto = -1`` rather than raising:
a packet the parser cannot read is still a packet to count and verdict.
"""

from __future__ import annotations

from struct import Struct
from typing import NamedTuple

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
MALFORMED = -1

_IPV4 = Struct("!BBHHHBBH4s4s")
_IPV6 = Struct("!IHBB16s16s")
_PORTS = Struct("!HH")
_TCP_FLAGS_OFFSET = 13

# IPv6 extension headers we step over to find the transport header (RFC 8200 §4).
_IPV6_EXT = {0, 43, 60, 51, 135, 139, 140, 253, 254}
_IPV6_FRAGMENT = 44


class Header(NamedTuple):
    version: int  # 4 or 6; 0 when not even the version nibble is readable
    proto: int  # transport protocol number, or MALFORMED
    src: bytes  # 4 or 16 bytes
    dst: bytes
    length: int  # IP total length from the header (may exceed what NFQUEUE copied)
    l4_offset: int  # where the transport header starts in the payload
    sport: int  # TCP/UDP ports; ICMP type and code
    dport: int
    tcp_flags: int  # 0 unless TCP
    dont_fragment: bool  # IPv4 DF; always True for IPv6 (routers never fragment it)
    first_fragment: bool  # False for a non-first fragment, whose ports are not in this packet


_MALFORMED = Header(0, MALFORMED, b"", b"", 0, 0, 0, 0, 0, False, True)


def parse(data: bytes) -> Header:
    """Parse the IP and transport headers of ``data``; never raises on bad input."""
    n = len(data)
    if n < 1:
        return _MALFORMED
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            return _MALFORMED._replace(version=4)
        ver_ihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(data)
        ihl = (ver_ihl & 0x0F) * 4
        if ihl < 20 or ihl > n:
            return _MALFORMED._replace(version=4)
        df = bool(frag & 0x4000)
        first = (frag & 0x1FFF) == 0
        return _transport(4, proto, src, dst, total, ihl, data, df, first)
    if version == 6:
        if n < 40:
            return _MALFORMED._replace(version=6)
        _vtf, plen, nxt, _hop, src, dst = _IPV6.unpack_from(data)
        off = 40
        first = True
        # Bounded walk over extension headers; a loop of them cannot stall us.
        for _ in range(8):
            if nxt == _IPV6_FRAGMENT:
                if off + 8 > n:
                    return _MALFORMED._replace(version=6)
                first = (int.from_bytes(data[off + 2 : off + 4], "big") & 0xFFF8) == 0
                nxt = data[off]
                off += 8
            elif nxt in _IPV6_EXT:
                if off + 2 > n:
                    return _MALFORMED._replace(version=6)
                step = (data[off + 1] + 2) * 4 if nxt == 51 else (data[off + 1] + 1) * 8
                nxt = data[off]
                off += step
            else:
                break
        if off > n:
            return _MALFORMED._replace(version=6)
        return _transport(6, nxt, src, dst, 40 + plen, off, data, True, first)
    return _MALFORMED


def _transport(
    version: int,
    proto: int,
    src: bytes,
    dst: bytes,
    total: int,
    off: int,
    data: bytes,
    df: bool,
    first: bool,
) -> Header:
    sport = dport = flags = 0
    if first:
        if proto == PROTO_TCP or proto == PROTO_UDP:
            if off + 4 > len(data):
                return Header(version, MALFORMED, src, dst, total, off, 0, 0, 0, df, first)
            sport, dport = _PORTS.unpack_from(data, off)
            if proto == PROTO_TCP and off + _TCP_FLAGS_OFFSET < len(data):
                flags = data[off + _TCP_FLAGS_OFFSET]
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            if off + 2 > len(data):
                return Header(version, MALFORMED, src, dst, total, off, 0, 0, 0, df, first)
            sport, dport = data[off], data[off + 1]
    return Header(version, proto, src, dst, total, off, sport, dport, flags, df, first)


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum: the ones' complement of the ones' complement sum of 16-bit words.

    ``int.from_bytes(...) % 0xFFFF`` is that sum because 2**16 ≡ 1 (mod 0xFFFF); it only
    cannot tell +0 from -0: non-zero data summing to a multiple of 0xFFFF is -0 (0xFFFF) in
    ones' complement arithmetic, all-zero data is +0.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8  # pad with a zero byte
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF
    return ~total & 0xFFFF
