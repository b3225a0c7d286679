"""DNS stage: rewrite or block the DNS answers travelling to the VM.

Takes a whole IP packet (IPv4 or IPv6, UDP from port 53, as NFQUEUE hands it over) and the
skin's compiled ``dns`` section; returns an outcome and, for a matched answer, a rebuilt packet
with fresh IP/UDP lengths and checksums. Pure and sans-IO; never raises on any input.

Theory of operation. An answer is judged by its whole chain, so an alias cannot sidestep a
pattern: every question name, then each answer record's owner name and CNAME/DNAME target, in
the order they appear (the chain's order as resolvers send it). A name anywhere in the chain
matching ``block`` makes the whole answer NXDOMAIN; otherwise the first name in that order with
a matching ``rewrite`` picks the address; otherwise the answer passes untouched. Names are read
with plain byte reads, compression pointers followed with bounded hops and memoized
by offset (owner names are mostly pointers to a name already read), and judged by a walk over a
suffix index, one dict probe per label, stopping at the first suffix no pattern shares.
A matched answer is not edited but *synthesized* from the questions (same id, questions echoed,
the configured address or NXDOMAIN/NODATA), so nothing of the upstream answer can leak and no
DNS library is needed: the wire format of the answer is a handful of ``struct`` packs. Only the
upstream's OPT (EDNS) record is carried over. dnslib is used by the tests as the independent
parser that every rebuilt message must satisfy.

Limits, on purpose: names in the authority and additional sections are not judged (they are
not the answer, and a rebuilt answer drops them); an answer whose chain cannot be read to the
end is MALFORMED and passes, unless a name read before the damage already matched; a fragmented
answer is MALFORMED (the datagram is not all in this packet, so it cannot be rebuilt); no SOA
is synthesized, so resolvers do not cache the NXDOMAIN/NODATA and a skin swap takes effect at
once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from struct import Struct
from struct import error as struct_error

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
_TYPE_CNAME = 5
_TYPE_DNAME = 39
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
# A name has at most 127 labels, so a well-formed one needs no more hops than that; past it
# the pointers loop.
_MAX_POINTER_HOPS = 127

_DNS_HEADER = Struct("!6H")
_U16 = Struct("!H")
_TWO_U16 = Struct("!HH")
_RR_FIXED = Struct("!HHIH")  # type, class, ttl, rdlength
_PSEUDO_V4 = Struct("!4s4sBBH")
_PSEUDO_V6 = Struct("!16s16sI3xB")
_QUESTION_TAIL = Struct("!BHH")  # the root label ending the name, qtype, qclass


# One node of the suffix index: the first block pattern (skin order) and the first rewrite entry
# that are exactly this name, then those that are ``*.`` + this name.
_Node = tuple  # (exact_block, wildcard_block, exact_rewrite, wildcard_rewrite)


@dataclass(frozen=True, slots=True)
class CompiledDns:
    """A skin's ``dns`` section, ready for the hot path.

    ``rewrite`` keeps the patterns in the skin's order as (pattern, address, is_v6); ``block``
    the block patterns. Lookups go through one index derived from them, keyed by every label
    suffix of every pattern (``*.ads.test`` gives ``test`` and ``ads.test``): a name is walked
    from its last label leftwards, one dict probe per label, and the walk stops at the first
    suffix no pattern shares, so most names cost a probe or two whatever the number of patterns.
    Among several matching rewrite patterns the earliest wins.
    """

    rewrite: tuple[tuple[str, str, bool], ...] = ()
    block: tuple[str, ...] = ()
    ttl: int = 60  # of synthesized records, s
    delay_ns: int = 0  # added to every DNS answer (applied by the caller)
    _index: dict[str, _Node] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nodes: dict[str, list] = {}

        def add(pattern: str, slot: int, value) -> None:
            pattern = normalize_name(pattern)
            wildcard = pattern.startswith("*.")
            base = pattern[2:] if wildcard else pattern
            dot = len(base)
            while dot >= 0:  # every label suffix of the base is a node on the walk to it
                dot = base.rfind(".", 0, dot)
                nodes.setdefault(base[dot + 1 :], [None, None, None, None])
            node = nodes[base]
            slot += wildcard
            if node[slot] is None:  # the earlier pattern wins
                node[slot] = value

        for order, pattern in enumerate(self.block):
            add(pattern, 0, order)
        for order, (pattern, address, is_v6) in enumerate(self.rewrite):
            packed = ipaddress.ip_address(address).packed
            if (len(packed) == 16) != is_v6:
                raise ValueError(f"dns rewrite {pattern!r}: {address!r} is_v6={is_v6} disagrees")
            add(pattern, 2, (order, pattern, address, is_v6, packed))
        object.__setattr__(self, "_index", {key: tuple(node) for key, node in nodes.items()})

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


def _judge(name: str, index: dict[str, _Node]) -> tuple[int | None, tuple | None]:
    """The first block pattern's order matching a normalized name, else the first rewrite entry.

    Returns (block order, None) as soon as a block pattern matches, else (None, entry or None).
    A wildcard matches strictly below its base, an exact pattern the name itself.
    """
    rule = None
    end = len(name)
    while True:
        dot = name.rfind(".", 0, end)
        node = index.get(name[dot + 1 :])
        if node is None:
            return None, rule
        if dot < 0:  # the whole name: the exact patterns
            if node[0] is not None:
                return node[0], None
            candidate = node[2]
        else:  # a proper suffix: the wildcards below it
            if node[1] is not None:
                return node[1], None
            candidate = node[3]
            end = dot
        if candidate is not None and (rule is None or candidate < rule):
            rule = candidate
        if dot < 0:
            return None, rule


def _first(name: str, index: dict[str, _Node], slot: int):
    """The earliest value in ``slot`` (0 block, 2 rewrite) of the patterns matching ``name``."""
    best = None
    end = len(name)
    while True:
        dot = name.rfind(".", 0, end)
        node = index.get(name[dot + 1 :])
        if node is None:
            return best
        found = node[slot] if dot < 0 else node[slot + 1]
        if found is not None and (best is None or found < best):
            best = found
        if dot < 0:
            return best
        end = dot


def match_block(dns: CompiledDns, name: str) -> str | None:
    """The first block pattern matching a normalized name, or None."""
    order = _first(name, dns._index, 0)
    return None if order is None else dns.block[order]


def match_rewrite(dns: CompiledDns, name: str) -> tuple[str, str, bool] | None:
    """The first rewrite rule (pattern, address, is_v6) matching a normalized name, or None."""
    entry = _first(name, dns._index, 2)
    return None if entry is None else dns.rewrite[entry[0]]


def match_name(dns: CompiledDns, name: str) -> str:
    """What the stage does with a question for ``name``: BLOCKED, REWRITTEN or UNMATCHED.

    Block is checked before rewrite. ``name`` may have any case and a trailing dot.
    """
    block, rule = _judge(normalize_name(name), dns._index)
    if block is not None:
        return BLOCKED
    return REWRITTEN if rule is not None else UNMATCHED


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

    msg_id, flags, qdcount, ancount, _ns, _ar = _DNS_HEADER.unpack_from(message)
    if not flags & _QR or qdcount == 0:
        return MALFORMED, None
    decoded: dict[int, tuple[str, int, int]] = {}
    questions = []  # (offset of the name, qtype, qclass)
    chain = []  # normalized names, question names first
    offset = 12
    try:
        for _ in range(qdcount):
            name_offset = offset
            name, offset, _wire = _name_at(message, offset, decoded, 0)
            qtype, qclass = _TWO_U16.unpack_from(message, offset)
            offset += 4
            questions.append((name_offset, qtype, qclass))
            chain.append(name)
    except _UNREADABLE:
        return MALFORMED, None
    if flags & _OPCODE:  # NOTIFY, UPDATE…: not a name lookup
        return UNMATCHED, None
    index = dns._index
    if not index:
        return UNMATCHED, None
    questions_end = offset

    # The rest of the chain: each answer record's owner and CNAME/DNAME target, in the order
    # they appear (the chain's order in answers as resolvers send them).
    damaged = False
    end = len(message)
    try:
        for _ in range(ancount):
            size = message[offset]
            if size >= 0xC0 and (known := decoded.get(((size & 0x3F) << 8) | message[offset + 1])):
                # The usual owner: a pointer to a name already read (the question, a target).
                name = known[0]
                offset += 2
            else:
                name, offset, _wire = _name_at(message, offset, decoded, 0)
            chain.append(name)
            rtype, _class, _ttl, rdlength = _RR_FIXED.unpack_from(message, offset)
            offset += 10
            rdata_end = offset + rdlength
            if rdata_end > end:
                raise ValueError("record data past the message")
            if rtype == _TYPE_CNAME or rtype == _TYPE_DNAME:
                name, target_end, _wire = _name_at(message, offset, decoded, 0)
                if target_end != rdata_end:
                    raise ValueError("alias target does not fill its record")
                chain.append(name)
            offset = rdata_end
    except _UNREADABLE:
        # The rest of the chain is unknown. A match among the names read still applies (what
        # is sent instead is built from the questions alone); without one the answer passes.
        damaged = True

    rule = None
    for name in dict.fromkeys(chain):  # each name once, in chain order
        block, found = _judge(name, index)
        if block is not None:
            dns_message = _synthesize(message, msg_id, flags, _RCODE_NXDOMAIN, questions, questions_end, b"")
            return (MALFORMED, None) if dns_message is None else (BLOCKED, _rebuild(packet, header, dns_message))
        if rule is None:
            rule = found
    if rule is None:
        return (MALFORMED if damaged else UNMATCHED), None

    _order, _pattern, _address, is_v6, address = rule
    wanted = _QTYPE_AAAA if is_v6 else _QTYPE_A
    record = _RR_FIXED.pack(wanted, _CLASS_IN, dns.ttl, len(address)) + address
    dns_message = _synthesize(message, msg_id, flags, _RCODE_NOERROR, questions, questions_end, record, wanted)
    return (MALFORMED, None) if dns_message is None else (REWRITTEN, _rebuild(packet, header, dns_message))


# ValueError: a name or record that breaks the rules; IndexError and struct.error: it runs past
# the end of the message.
_UNREADABLE = (ValueError, IndexError, struct_error)


def _name_at(message: bytes, offset: int, decoded: dict, hops: int) -> tuple[str, int, int]:
    """The normalized name at ``offset``, the offset after it and its length in wire bytes.

    Compression pointers are followed wherever they lead in the message (lenient resolvers
    accept forward pointers too, so an alias must not hide behind one); a loop ends at
    ``_MAX_POINTER_HOPS``. ``decoded`` memoizes names by offset: owner names are mostly
    pointers to names already read. Raises one of ``_UNREADABLE``.
    """
    known = decoded.get(offset)
    if known is not None:
        return known
    position = offset
    labels = 0
    while True:  # the labels written here, up to the root label or a pointer
        size = message[position]
        if size == 0 or size >= 0x40:
            break
        position += 1 + size
        labels += 1
    if size == 0:
        after = position + 1
        suffix = ""
        wire_bytes = after - offset
    elif size >= 0xC0:
        if hops >= _MAX_POINTER_HOPS:
            raise ValueError("compression pointer loop")
        target = ((size & 0x3F) << 8) | message[position + 1]
        suffix, _after, suffix_bytes = _name_at(message, target, decoded, hops + 1)
        after = position + 2
        wire_bytes = position - offset + suffix_bytes
    else:
        raise ValueError("extended label type")
    if wire_bytes > _MAX_NAME_BYTES:
        raise ValueError("name longer than 255 bytes")
    if labels:
        # The labels as text: each length byte after the first becomes a dot.
        text = bytearray(message[offset + 1 : position])
        index = message[offset]
        while index < len(text):
            size = text[index]
            text[index] = 0x2E
            index += 1 + size
        if text.count(b".") != labels - 1:
            # A dot inside a label: escape it so that it cannot pose as a label boundary.
            text = b".".join(label.replace(b".", b"\\046") for label in _labels_at(message, offset)[:labels])
        name = text.lower().decode("latin-1")
        if suffix:
            name = f"{name}.{suffix}"
    else:
        name = suffix
    result = (name, after, wire_bytes)
    decoded[offset] = result
    return result


def _labels_at(message: bytes, offset: int) -> list[bytes]:
    """The labels of a name already read by ``_name_at``, as sent (case kept), to echo them."""
    labels = []
    for _ in range(_MAX_POINTER_HOPS + 1 + _MAX_NAME_BYTES):
        size = message[offset]
        if size == 0:
            return labels
        if size >= 0xC0:
            offset = ((size & 0x3F) << 8) | message[offset + 1]
        else:
            labels.append(message[offset + 1 : offset + 1 + size])
            offset += 1 + size
    raise ValueError("name not read by _name_at")


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


def _find_opt(message: bytes, offset: int) -> bytes | None:
    """The upstream's OPT record, its extended RCODE cleared and any EDE option dropped.

    ``offset`` is where the questions end. Lenient on purpose: the answer we send is built from
    the questions alone, so damage after them costs only the EDNS record, never the rewrite.
    """
    end = len(message)
    try:
        _id, _flags, _qd, ancount, nscount, arcount = _DNS_HEADER.unpack_from(message)
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
    message: bytes,
    msg_id: int,
    flags: int,
    rcode: int,
    questions: list[tuple[int, int, int]],
    questions_end: int,
    record: bytes,
    wanted_type: int = 0,
) -> bytes | None:
    """A response with the questions, ``record`` for each question of ``wanted_type``, the OPT.

    ``record`` is an answer record without its owner name; each copy names its question by a
    pointer. The questions are written without compression, so a single one is byte for byte
    the upstream's. None when even they do not fit the size the client is known to accept
    (only an upstream sending many compressed questions, which no client asks, gets there).
    """
    opt = _find_opt(message, questions_end)
    # The client's EDNS size is in its query, which we never see; the upstream answer reached
    # it, so the client takes at least that many bytes. Without EDNS the limit is 512.
    limit = _NO_EDNS_LIMIT_BYTES if opt is None else max(_NO_EDNS_LIMIT_BYTES, len(message))
    section = bytearray()
    answers = []
    for name_offset, qtype, qclass in questions:
        new_offset = 12 + len(section)
        labels = _labels_at(message, name_offset)
        for label in labels:
            section.append(len(label))
            section += label
        section += _QUESTION_TAIL.pack(0, qtype, qclass)
        if qtype == wanted_type and (qclass == _CLASS_IN or qclass == _CLASS_ANY):
            # NODATA for any other type: the name exists (it has the address) but not this type.
            owner = _U16.pack(0xC000 | new_offset) if new_offset < 0x4000 else _wire_name(labels)
            answers.append(owner + record)
    size = 12 + len(section) + (len(opt) if opt else 0)
    if size > limit:
        return None
    new_flags = _QR | (flags & _KEPT_FLAGS) | rcode
    if size + sum(map(len, answers)) > limit:
        # Only the answers can overflow what the upstream message held. Say so, as a server would.
        new_flags |= _TC
        answers = []
    head = _DNS_HEADER.pack(msg_id, new_flags, len(questions), len(answers), 0, 1 if opt else 0)
    return head + bytes(section) + b"".join(answers) + (opt or b"")


def _wire_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


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
