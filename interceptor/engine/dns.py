"""DNS stage: rewrite or block the DNS answers travelling to the VM.

Takes a whole IP packet (IPv4 or IPv6, UDP from port 53, as NFQUEUE hands it over) and the
skin's compiled ``dns`` section; returns an outcome and, for a matched question, a rebuilt
packet with fresh IP/UDP lengths and checksums. Pure and sans-IO; never raises on any input.

Theory of operation. Most answers match no pattern, so the cheap path reads only the DNS header
and the first question with fixed-offset byte reads and one dict lookup per label of the name.
A matched answer is not edited but *synthesized* from the question (same id, question echoed,
the configured address or NXDOMAIN/NODATA), so nothing of the upstream answer can leak and no
DNS library is needed: the wire format of a one-record answer is a handful of ``struct`` packs.
Only the upstream's OPT (EDNS) record is carried over. dnslib is used by the tests as the
independent parser that every rebuilt message must satisfy.

Limits, on purpose: an unmatched answer is judged by its header and first question only (it
passes unchanged, so nothing more is worth reading); a fragmented answer is MALFORMED (the
datagram is not all in this packet, so it cannot be rebuilt); no SOA is synthesized, so
resolvers do not cache the NXDOMAIN/NODATA and a skin swap takes effect at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from struct import Struct

from interceptor.packet import PROTO_UDP, Header, internet_checksum

# Outcomes, also the counter keys.
REWRITTEN = "rewritten"  # the question matched a rewrite pattern; a synthesized answer replaces it
BLOCKED = "blocked"  # the question matched a block pattern; NXDOMAIN replaces it
UNMATCHED = "unmatched"  # a DNS answer no pattern matched (or not a standard query); unchanged
TRUNCATED = "truncated"  # NFQUEUE copied only part of the packet; never rebuilt
MALFORMED = "malformed"  # not a readable IP/UDP/DNS response with a question; unchanged
OUTCOMES = (REWRITTEN, BLOCKED, UNMATCHED, TRUNCATED, MALFORMED)

DNS_PORT = 53

_QTYPE_A = 1
_QTYPE_AAAA = 28
_QTYPE_OPT = 41
_CLASS_IN = 1
_CLASS_ANY = 255
_RCODE_NOERROR = 0
_RCODE_NXDOMAIN = 3
_EDE_OPTION = 15  # RFC 8914 Extended DNS Error: it describes the upstream answer, not ours

# Header flag bits (RFC 1035 §4.1.1, RFC 4035 §3.2 for AD/CD).
_QR = 0x8000
_OPCODE = 0x7800
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_CD = 0x0010
_KEPT_FLAGS = _RD | _RA | _CD  # echoed from the upstream; AA, AD and Z are cleared

_NO_EDNS_LIMIT_BYTES = 512  # RFC 1035 §4.2.1
_MAX_NAME_BYTES = 255

_DNS_HEADER = Struct("!6H")
_U16 = Struct("!H")
_TWO_U16 = Struct("!HH")
_RR_FIXED = Struct("!HHIH")  # type, class, ttl, rdlength
_PSEUDO_V4 = Struct("!4s4sBBH")
_PSEUDO_V6 = Struct("!16s16sI3xB")
_ANSWER_NAME = b"\xc0\x0c"  # compression pointer to the first question's name at offset 12


@dataclass(frozen=True, slots=True)
class CompiledDns:
    """A skin's ``dns`` section, ready for the hot path.

    ``rewrite`` keeps the patterns in the skin's order as (pattern, address, is_v6); ``block``
    the block patterns. Lookups go through indexes derived from them: a name is looked up as
    itself and as ``*.`` + each of its proper suffixes, one dict probe per label whatever the
    number of patterns; among several matching rewrite patterns the earliest wins.
    """

    rewrite: tuple[tuple[str, str, bool], ...] = ()
    block: tuple[str, ...] = ()
    ttl: int = 60  # of synthesized records, s
    delay_ns: int = 0  # added to every DNS answer (applied by the caller)
    _rewrite_index: dict[str, tuple[int, str, str, bool, bytes]] = field(
        init=False, repr=False, compare=False
    )
    _block_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rewrite_index: dict[str, tuple[int, str, str, bool, bytes]] = {}
        for order, (pattern, address, is_v6) in enumerate(self.rewrite):
            packed = ipaddress.ip_address(address).packed
            if (len(packed) == 16) != is_v6:
                raise ValueError(f"dns rewrite {pattern!r}: {address!r} is_v6={is_v6} disagrees")
            entry = (order, pattern, address, is_v6, packed)
            rewrite_index.setdefault(normalize_name(pattern), entry)
        block_index: dict[str, int] = {}
        for order, pattern in enumerate(self.block):
            block_index.setdefault(normalize_name(pattern), order)
        object.__setattr__(self, "_rewrite_index", rewrite_index)
        object.__setattr__(self, "_block_index", block_index)

    @property
    def rewrites_answers(self) -> bool:
        return bool(self.rewrite or self.block)


def compile_dns(
    rewrite: dict[str, object], block: list[str], ttl: int = 60, delay_ms: float = 0
) -> CompiledDns:
    """Compile a validated ``DnsConfig`` (addresses may be strings or ``ipaddress`` objects)."""
    rules = []
    for pattern, address in rewrite.items():
        ip = ipaddress.ip_address(str(address))
        rules.append((normalize_name(pattern), str(ip), ip.version == 6))
    return CompiledDns(
        rewrite=tuple(rules),
        block=tuple(normalize_name(p) for p in block),
        ttl=int(ttl),
        delay_ns=round(delay_ms * 1_000_000),
    )


def normalize_name(name: str) -> str:
    """The form names and patterns are compared in: ASCII lower case, no trailing dot."""
    return name.lower().rstrip(".")


def _first_match(name: str, table: dict):
    """The entry of the earliest pattern matching a normalized name, or None.

    The candidates are the name itself and ``*.`` + each proper suffix: one dict probe per
    label, whatever the number of patterns. Entries compare by their skin order first.
    """
    best = table.get(name)
    dot = name.find(".")
    while dot >= 0:
        entry = table.get("*" + name[dot:])
        if entry is not None and (best is None or entry < best):
            best = entry
        dot = name.find(".", dot + 1)
    return best


def match_block(dns: CompiledDns, name: str) -> str | None:
    """The first block pattern matching a normalized name, or None."""
    order = _first_match(name, dns._block_index)
    return None if order is None else dns.block[order]


def match_rewrite(dns: CompiledDns, name: str) -> tuple[str, str, bool] | None:
    """The first rewrite rule (pattern, address, is_v6) matching a normalized name, or None."""
    entry = _first_match(name, dns._rewrite_index)
    return None if entry is None else dns.rewrite[entry[0]]


def match_name(dns: CompiledDns, name: str) -> str:
    """What the stage does with a question for ``name``: BLOCKED, REWRITTEN or UNMATCHED.

    Block is checked before rewrite. ``name`` may have any case and a trailing dot.
    """
    name = normalize_name(name)
    if _first_match(name, dns._block_index) is not None:
        return BLOCKED
    return REWRITTEN if _first_match(name, dns._rewrite_index) is not None else UNMATCHED


# --- checksums ------------------------------------------------------------------------------


def ipv4_header_checksum(ip_header: bytes) -> int:
    """The IPv4 header checksum of ``ip_header`` (its own checksum field is taken as zero)."""
    return internet_checksum(ip_header[:10] + b"\0\0" + ip_header[12:])


def udp_checksum(src: bytes, dst: bytes, udp: bytes) -> int:
    """The UDP checksum over the pseudo-header and ``udp`` (its checksum field taken as zero).

    IPv4 or IPv6 by the address length. A computed 0 is returned as 0xFFFF, as it must be sent
    (RFC 768; 0 means "no checksum", which IPv6 forbids).
    """
    if len(src) == 4:
        pseudo = _PSEUDO_V4.pack(src, dst, 0, PROTO_UDP, len(udp))
    else:
        pseudo = _PSEUDO_V6.pack(src, dst, len(udp), PROTO_UDP)
    checksum = internet_checksum(pseudo + udp[:6] + b"\0\0" + udp[8:])
    return checksum or 0xFFFF


# --- the stage ------------------------------------------------------------------------------


def is_dns_answer(header: Header) -> bool:
    """Whether the packet may be a DNS answer worth looking at: UDP from port 53."""
    return header.proto == PROTO_UDP and header.sport == DNS_PORT


def rewrite_answer(packet: bytes, header: Header, dns: CompiledDns) -> tuple[str, bytes | None]:
    """Outcome and, for BLOCKED/REWRITTEN, the rebuilt packet to send instead of ``packet``.

    ``header`` is ``packet.parse(packet)``. Never raises: anything unreadable is MALFORMED and
    the caller passes the packet on unchanged.
    """
    try:
        return _rewrite_answer(packet, header, dns)
    except Exception:  # noqa: BLE001 - hostile bytes must never take the data path down
        return MALFORMED, None


def _rewrite_answer(packet: bytes, header: Header, dns: CompiledDns) -> tuple[str, bytes | None]:
    if header.length > len(packet):
        return TRUNCATED, None
    if header.proto != PROTO_UDP or not header.first_fragment:
        return MALFORMED, None
    l4 = header.l4_offset
    if header.version == 4:
        if int.from_bytes(packet[6:8], "big") & 0x3FFF:  # MF or an offset: part of a datagram
            return MALFORMED, None
    elif header.version != 6:
        return MALFORMED, None
    if l4 + 8 > header.length:
        return MALFORMED, None
    udp_length = int.from_bytes(packet[l4 + 4 : l4 + 6], "big")
    if udp_length < 8 + 12 or l4 + udp_length > header.length:
        return MALFORMED, None
    message = packet[l4 + 8 : l4 + udp_length]

    msg_id, flags, qdcount, _an, _ns, _ar = _DNS_HEADER.unpack_from(message)
    if not flags & _QR or qdcount == 0:
        return MALFORMED, None
    question = _read_question(message)
    if question is None:
        return MALFORMED, None
    if flags & _OPCODE:  # NOTIFY, UPDATE…: not a name lookup
        return UNMATCHED, None
    name, question_end = question

    if _first_match(name, dns._block_index) is not None:
        outcome, rcode, answer = BLOCKED, _RCODE_NXDOMAIN, b""
    else:
        rule = _first_match(name, dns._rewrite_index)
        if rule is None:
            return UNMATCHED, None
        outcome, rcode, answer = REWRITTEN, _RCODE_NOERROR, b""
        _order, _pattern, _address, is_v6, address = rule
        qtype, qclass = _TWO_U16.unpack_from(message, question_end - 4)
        wanted = _QTYPE_AAAA if is_v6 else _QTYPE_A
        if qtype == wanted and (qclass == _CLASS_IN or qclass == _CLASS_ANY):
            answer = _ANSWER_NAME + _RR_FIXED.pack(wanted, _CLASS_IN, dns.ttl, len(address))
            answer += address
        # Otherwise NODATA: the name exists (it has the configured address) but not this type.

    opt = _find_opt(message, question_end, qdcount)
    # The client's EDNS size is in its query, which we never see; the upstream answer reached
    # it, so the client takes at least that many bytes. Without EDNS the limit is 512.
    limit = _NO_EDNS_LIMIT_BYTES if opt is None else max(_NO_EDNS_LIMIT_BYTES, len(message))
    dns_message = _synthesize(msg_id, flags, rcode, message[12:question_end], answer, opt, limit)
    return outcome, _rebuild(packet, header, dns_message)


def _read_question(message: bytes) -> tuple[str, int] | None:
    """The first question's normalized name and where the question ends, or None."""
    labels = []
    offset = 12
    end = len(message)
    while True:
        if offset >= end:
            return None
        size = message[offset]
        if size == 0:
            offset += 1
            break
        if size > 63:  # compression pointer or extended label type: never in a first question
            return None
        labels.append(message[offset + 1 : offset + 1 + size])
        offset += 1 + size
        if offset - 12 >= _MAX_NAME_BYTES:
            return None
    if offset + 4 > end:
        return None
    name = b".".join(labels).lower()
    if labels and name.count(b".") != len(labels) - 1:
        # A dot inside a label: escape it so that it cannot pose as a label boundary.
        name = b".".join(label.replace(b".", b"\\046") for label in labels).lower()
    return name.decode("latin-1"), offset + 4


def _skip_name(message: bytes, offset: int) -> int:
    while True:
        size = message[offset]
        if size == 0:
            return offset + 1
        if size >= 0xC0:
            return offset + 2
        if size > 63:
            raise ValueError("extended label type")
        offset += 1 + size


def _find_opt(message: bytes, offset: int, qdcount: int) -> bytes | None:
    """The upstream's OPT record, its extended RCODE cleared and any EDE option dropped.

    Lenient on purpose: the answer we send is built from the question alone, so damage after
    the question costs only the EDNS record, never the rewrite.
    """
    end = len(message)
    try:
        _id, _flags, _qd, ancount, nscount, arcount = _DNS_HEADER.unpack_from(message)
        for _ in range(qdcount - 1):
            offset = _skip_name(message, offset) + 4
        for index in range(ancount + nscount + arcount):
            if offset >= end:
                return None
            start = offset
            offset = _skip_name(message, offset)
            rtype, size, ext_flags, rdlength = _RR_FIXED.unpack_from(message, offset)
            offset += 10 + rdlength
            if offset > end:
                return None
            if rtype == _QTYPE_OPT and index >= ancount + nscount and message[start] == 0:
                options = _drop_ede(message[offset - rdlength : offset])
                return b"\0" + _RR_FIXED.pack(
                    _QTYPE_OPT, size, ext_flags & 0x00FFFFFF, len(options)
                ) + options
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return None


def _drop_ede(options: bytes) -> bytes:
    kept = []
    offset = 0
    while offset + 4 <= len(options):
        code, size = _TWO_U16.unpack_from(options, offset)
        item = options[offset : offset + 4 + size]
        offset += 4 + size
        if code != _EDE_OPTION:
            kept.append(item)
    return b"".join(kept)


def _synthesize(
    msg_id: int,
    flags: int,
    rcode: int,
    question: bytes,
    answer: bytes,
    opt: bytes | None,
    limit: int,
) -> bytes:
    """A response with one question, at most one answer and at most the OPT record."""
    new_flags = _QR | (flags & _KEPT_FLAGS) | rcode
    size = 12 + len(question) + len(answer) + (len(opt) if opt else 0)
    if size > limit:
        # Only the answer can overflow: with an OPT the limit is at least the upstream message,
        # which held the same header, question and (unshrunk) OPT. Say so, as a server would.
        new_flags |= _TC
        answer = b""
    head = _DNS_HEADER.pack(msg_id, new_flags, 1, 1 if answer else 0, 0, 1 if opt else 0)
    return head + question + answer + (opt or b"")


def _rebuild(packet: bytes, header: Header, dns_message: bytes) -> bytes:
    """``packet`` with its UDP payload replaced; lengths and checksums recomputed."""
    l4 = header.l4_offset
    udp_length = 8 + len(dns_message)
    udp = packet[l4 : l4 + 4] + _U16.pack(udp_length) + b"\0\0" + dns_message
    udp = udp[:6] + _U16.pack(udp_checksum(header.src, header.dst, udp)) + udp[8:]
    if header.version == 4:
        ip = bytearray(packet[:l4])
        ip[2:4] = _U16.pack(l4 + udp_length)
        ip[10:12] = _U16.pack(ipv4_header_checksum(bytes(ip)))
    else:
        # The payload length counts extension headers too; they are kept as they were.
        ip = bytearray(packet[:l4])
        ip[4:6] = _U16.pack(l4 - 40 + udp_length)
    return bytes(ip) + udp
