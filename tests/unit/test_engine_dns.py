"""DNS stage: answer rewriting and blocking, rebuilt packets checked with dnslib and scapy.

Fixtures are built with dnslib (the DNS message) and scapy (the IP/UDP wrapper); both are
independent of the hand-written wire code under test, and every rebuilt packet must re-parse
with dnslib and survive scapy recomputing its lengths and checksums unchanged.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RR, A, DNSHeader, DNSRecord, EDNSOption
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from interceptor import packet
from interceptor.engine.dns import (
    BLOCKED,
    MALFORMED,
    OUTCOMES,
    REWRITTEN,
    TRUNCATED,
    UNMATCHED,
    CompiledDns,
    compile_dns,
    internet_checksum,
    ipv4_header_checksum,
    is_dns_answer,
    match_block,
    match_name,
    match_rewrite,
    rewrite_answer,
    udp_checksum,
)

VM4, RESOLVER4 = "10.77.1.2", "8.8.8.8"
VM6, RESOLVER6 = "fd00:77::2", "2001:4860:4860::8888"
CLIENT_PORT = 40123


# --- fixtures -------------------------------------------------------------------------------


def upstream_answer(
    name: str,
    qtype: str = "A",
    *,
    msg_id: int = 0x1234,
    ra: bool = True,
    records: tuple[RR, ...] | None = None,
    authority: tuple[RR, ...] = (),
    edns: EDNS0 | None = None,
) -> bytes:
    """A resolver's answer as dnslib packs it: by default one real A/AAAA record."""
    header = DNSHeader(id=msg_id, qr=1, aa=1, ra=int(ra), ad=1, rd=1)
    reply = DNSRecord(header, q=DNSRecord.question(name, qtype).q)
    if records is None:
        records = (
            (RR(name, QTYPE.A, rdata=A("93.184.216.34"), ttl=3600),)
            if qtype != "AAAA"
            else (RR(name, QTYPE.AAAA, rdata=AAAA("2606:2800:220:1::1"), ttl=3600),)
        )
    for record in records:
        reply.add_answer(record)
    for record in authority:
        reply.add_auth(record)
    if edns is not None:
        reply.add_ar(edns)
    return reply.pack()


def wrap4(message: bytes, *, options: bool = False, sport: int = 53) -> bytes:
    ip = IP(src=RESOLVER4, dst=VM4, ttl=57, id=4242)
    if options:
        ip.options = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()]
    return bytes(ip / UDP(sport=sport, dport=CLIENT_PORT) / Raw(message))


def wrap6(message: bytes, *, hop_by_hop: bool = False) -> bytes:
    ip = IPv6(src=RESOLVER6, dst=VM6, hlim=57)
    if hop_by_hop:
        ip = ip / IPv6ExtHdrHopByHop()
    return bytes(ip / UDP(sport=53, dport=CLIENT_PORT) / Raw(message))


def run(raw: bytes, dns: CompiledDns) -> tuple[str, bytes | None]:
    return rewrite_answer(raw, packet.parse(raw), dns)


def rewritten_message(raw: bytes, dns: CompiledDns, expected: str = REWRITTEN) -> DNSRecord:
    """Run the stage, check the rebuilt packet's IP/UDP framing and return its DNS message."""
    outcome, out = run(raw, dns)
    assert outcome == expected
    assert out is not None
    return DNSRecord.parse(check_framing(raw, out))


def check_framing(original: bytes, out: bytes) -> bytes:
    """Lengths and checksums are what scapy computes; addresses, ports, TTL, id kept."""
    version = out[0] >> 4
    if version == 4:
        parsed, before = IP(out), IP(original)
        fresh = parsed.copy()
        del fresh.len, fresh.chksum, fresh[UDP].len, fresh[UDP].chksum
        assert bytes(fresh) == out
        assert parsed.len == len(out)
        assert (parsed.ttl, parsed.id, parsed.options) == (before.ttl, before.id, before.options)
    else:
        parsed, before = IPv6(out), IPv6(original)
        fresh = parsed.copy()
        del fresh.plen, fresh[UDP].len, fresh[UDP].chksum
        assert bytes(fresh) == out
        assert parsed.plen == len(out) - 40
        assert parsed.hlim == before.hlim
    assert (parsed.src, parsed.dst) == (before.src, before.dst)
    udp = parsed[UDP]
    assert (udp.sport, udp.dport) == (before[UDP].sport, before[UDP].dport)
    assert udp.chksum != 0
    return bytes(udp.payload)


SKIN = compile_dns(
    {"*.example.com": "10.9.9.9", "v6.test": "fd00::99", "exact.test": "192.0.2.7"},
    ["ads.example.com", "*.tracker.test"],
    ttl=42,
    delay_ms=3.5,
)


# --- matching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("www.example.com", REWRITTEN),
        ("a.b.c.example.com", REWRITTEN),
        ("example.com", UNMATCHED),  # a wildcard matches strictly below its suffix
        ("notexample.com", UNMATCHED),
        ("exact.test", REWRITTEN),
        ("www.exact.test", UNMATCHED),  # an exact pattern is not a suffix
        ("EXACT.Test.", REWRITTEN),
        ("ads.example.com", BLOCKED),  # block wins over the *.example.com rewrite
        ("x.ads.example.com", REWRITTEN),
        ("deep.down.tracker.test", BLOCKED),
        ("tracker.test", UNMATCHED),
        ("", UNMATCHED),
    ],
)
def test_match_name(name, expected):
    assert match_name(SKIN, name) == expected


def test_first_pattern_in_skin_order_wins():
    wildcard, exact = ("*.example.com", "10.0.0.1"), ("www.example.com", "10.0.0.2")
    first_wildcard = compile_dns(dict([wildcard, exact]), [], 60, 0)
    first_exact = compile_dns(dict([exact, wildcard]), [], 60, 0)
    assert match_rewrite(first_wildcard, "www.example.com") == ("*.example.com", "10.0.0.1", False)
    assert match_rewrite(first_exact, "www.example.com") == ("www.example.com", "10.0.0.2", False)
    nested = compile_dns({"*.com": "10.0.0.3", "*.example.com": "10.0.0.1"}, [], 60, 0)
    assert match_rewrite(nested, "a.example.com")[0] == "*.com"
    assert match_block(SKIN, "x.tracker.test") == "*.tracker.test"
    assert match_block(SKIN, "www.example.com") is None


def test_compile_dns():
    rewrite = {"WWW.Example.com.": ipaddress.ip_address("10.0.0.1"), "v6.test": "FD00::0:1"}
    dns = compile_dns(rewrite, ["Ads.Test."], 5, 2.5)
    assert dns.rewrite == (("www.example.com", "10.0.0.1", False), ("v6.test", "fd00::1", True))
    assert dns.block == ("ads.test",)
    assert (dns.ttl, dns.delay_ns) == (5, 2_500_000)
    assert dns.rewrites_answers
    assert not compile_dns({}, [], 60, 10).rewrites_answers
    assert compile_dns({}, [], 60, 10) == CompiledDns(delay_ns=10_000_000)


def test_is_dns_answer():
    assert is_dns_answer(packet.parse(wrap4(upstream_answer("a.test"))))
    assert is_dns_answer(packet.parse(wrap6(upstream_answer("a.test"))))
    assert not is_dns_answer(packet.parse(wrap4(upstream_answer("a.test"), sport=5353)))


# --- rewritten answers ----------------------------------------------------------------------


@pytest.mark.parametrize("options", [False, True])
def test_a_question_gets_the_configured_address(options):
    raw = wrap4(upstream_answer("www.example.com", msg_id=0xBEEF), options=options)
    reply = rewritten_message(raw, SKIN)
    assert reply.header.id == 0xBEEF
    assert (reply.header.qr, reply.header.aa, reply.header.rcode, reply.header.tc) == (1, 0, 0, 0)
    assert reply.header.ra == 1 and reply.header.ad == 0
    assert [str(q.qname) for q in reply.questions] == ["www.example.com."]
    assert len(reply.rr) == 1
    record = reply.rr[0]
    assert (record.rtype, str(record.rname), record.ttl, str(record.rdata)) == (
        QTYPE.A,
        "www.example.com.",
        42,
        "10.9.9.9",
    )
    assert reply.auth == [] and reply.ar == []


@pytest.mark.parametrize("hop_by_hop", [False, True])
def test_aaaa_question_over_ipv6_gets_the_configured_ipv6_address(hop_by_hop):
    raw = wrap6(upstream_answer("v6.test", "AAAA"), hop_by_hop=hop_by_hop)
    reply = rewritten_message(raw, SKIN)
    assert [(r.rtype, str(r.rdata), r.ttl) for r in reply.rr] == [(QTYPE.AAAA, "fd00::99", 42)]


def test_question_case_is_echoed_and_matching_ignores_it():
    raw = wrap4(upstream_answer("WwW.ExAmPlE.CoM"))
    reply = rewritten_message(raw, SKIN)
    assert str(reply.questions[0].qname) == "WwW.ExAmPlE.CoM."
    assert str(reply.rr[0].rname) == "WwW.ExAmPlE.CoM."
    assert str(reply.rr[0].rdata) == "10.9.9.9"


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("www.example.com", "AAAA"),
        ("v6.test", "A"),
        ("www.example.com", "MX"),
        ("exact.test", "TXT"),
    ],
)
def test_other_family_or_type_gets_nodata_so_the_real_address_never_leaks(name, qtype):
    records = (RR(name, QTYPE.CNAME, rdata=CNAME("real.example.net"), ttl=30),)
    reply = rewritten_message(wrap4(upstream_answer(name, qtype, records=records)), SKIN)
    assert reply.header.rcode == 0
    assert reply.rr == [] and reply.auth == [] and reply.ar == []
    assert QTYPE[reply.questions[0].qtype] == qtype


def test_ra_is_kept_from_upstream_and_authority_is_dropped():
    soa = RR.fromZone("example.com. 300 IN NS ns1.example.com.")
    raw = wrap4(upstream_answer("x.example.com", ra=False, authority=tuple(soa)))
    reply = rewritten_message(raw, SKIN)
    assert reply.header.ra == 0
    assert reply.auth == []


def test_edns_record_is_kept_with_extended_rcode_cleared_and_ede_dropped():
    edns = EDNS0(
        udp_len=1232,
        flags="do",
        ext_rcode=1,
        opts=[EDNSOption(10, b"\x01" * 8), EDNSOption(15, b"\x00\x12blocked")],
    )
    reply = rewritten_message(wrap4(upstream_answer("www.example.com", edns=edns)), SKIN)
    assert len(reply.ar) == 1
    opt = reply.ar[0]
    assert (opt.rtype, opt.rclass) == (QTYPE.OPT, 1232)
    assert opt.ttl == 0x8000  # DO kept, extended RCODE and version zero
    assert [(o.code, o.data) for o in opt.rdata] == [(10, b"\x01" * 8)]
    assert str(reply.rr[0].rdata) == "10.9.9.9"


def test_an_answer_that_would_not_fit_is_sent_truncated():
    # Upstream: no answer but an OPT padded so that the message is just under 512 bytes; our
    # answer adds a 16-byte record and would exceed what the client is known to accept.
    bare = len(upstream_answer("www.example.com", records=(), edns=EDNS0(udp_len=512)))
    padding = EDNSOption(12, b"\0" * (510 - bare - 4))
    edns = EDNS0(udp_len=512, opts=[padding])
    raw = wrap4(upstream_answer("www.example.com", records=(), edns=edns))
    reply = rewritten_message(raw, SKIN)
    assert reply.header.tc == 1
    assert reply.rr == []
    assert str(reply.questions[0].qname) == "www.example.com."
    assert len(reply.pack()) <= 512


# --- blocked answers ------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [wrap4, wrap6])
def test_block_answers_nxdomain_with_the_question_echoed(wrap):
    raw = wrap(upstream_answer("Ads.Example.com", msg_id=7))
    reply = rewritten_message(raw, SKIN, expected=BLOCKED)
    assert reply.header.id == 7
    assert (reply.header.qr, reply.header.rcode, reply.header.aa) == (1, 3, 0)
    assert [str(q.qname) for q in reply.questions] == ["Ads.Example.com."]
    assert reply.rr == [] and reply.auth == [] and reply.ar == []


def test_block_keeps_edns():
    raw = wrap4(upstream_answer("a.tracker.test", "AAAA", edns=EDNS0(udp_len=4096)))
    reply = rewritten_message(raw, SKIN, expected=BLOCKED)
    assert reply.header.rcode == 3
    assert [(r.rtype, r.rclass) for r in reply.ar] == [(QTYPE.OPT, 4096)]


# --- passed unchanged -----------------------------------------------------------------------


def test_unmatched_answer_passes():
    assert run(wrap4(upstream_answer("example.org")), SKIN) == (UNMATCHED, None)
    assert run(wrap6(upstream_answer("example.com")), SKIN) == (UNMATCHED, None)


def test_truncated_copy_is_never_rebuilt():
    raw = wrap4(upstream_answer("www.example.com"))
    for cut in (len(raw) - 1, 30, 21):
        assert run(raw[:cut], SKIN) == (TRUNCATED, None)
    raw6 = wrap6(upstream_answer("www.example.com"))
    assert run(raw6[:-5], SKIN) == (TRUNCATED, None)


def test_malformed_and_odd_messages():
    query = DNSRecord.question("www.example.com").pack()
    assert run(wrap4(query), SKIN) == (MALFORMED, None)  # QR=0
    no_question = DNSRecord(DNSHeader(id=1, qr=1)).pack()
    assert run(wrap4(no_question), SKIN) == (MALFORMED, None)
    assert run(wrap4(b"\x81\x80"), SKIN) == (MALFORMED, None)
    notify = DNSRecord(DNSHeader(id=1, qr=1, opcode=4), q=DNSRecord.question("www.example.com").q)
    assert run(wrap4(notify.pack()), SKIN) == (UNMATCHED, None)
    first_fragment = bytearray(wrap4(upstream_answer("www.example.com")))
    first_fragment[6] |= 0x20  # more fragments: not all of the datagram is here
    assert run(bytes(first_fragment), SKIN) == (MALFORMED, None)
    assert run(b"", SKIN) == (MALFORMED, None)


# --- checksums ------------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_internet_checksum_agrees_with_scapy(data):
    assert internet_checksum(data) == scapy_checksum(data)


def test_checksum_edge_cases():
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(b"\0" * 6) == 0xFFFF  # +0 sum
    assert internet_checksum(b"\xff\xff") == 0  # -0 sum
    assert internet_checksum(b"\x12\x34\x56") == scapy_checksum(b"\x12\x34\x56")
    header = bytes(IP(src=RESOLVER4, dst=VM4) / UDP())[:20]
    assert ipv4_header_checksum(header) == int.from_bytes(header[10:12], "big")


@pytest.mark.parametrize(("src", "dst"), [(RESOLVER4, VM4), (RESOLVER6, VM6)])
def test_udp_checksum_zero_is_sent_as_ffff(src, dst):
    src_b, dst_b = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    udp = struct.pack("!4H", 53, CLIENT_PORT, 10, 0) + b"\0\0"
    if len(src_b) == 4:
        pseudo = src_b + dst_b + struct.pack("!BBH", 0, 17, 10)
    else:
        pseudo = src_b + dst_b + struct.pack("!I3xB", 10, 17)
    # Choose the two payload bytes so that the sum becomes -0 and the checksum exactly 0.
    fixed = udp[:8] + struct.pack("!H", internet_checksum(pseudo + udp))
    assert internet_checksum(pseudo + fixed) == 0
    assert udp_checksum(src_b, dst_b, fixed) == 0xFFFF


# --- properties -----------------------------------------------------------------------------

LABELS = st.sampled_from(["a", "B", "www", "Example", "com", "x-1", "_tcp", "test"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
PATTERNS = st.one_of(NAMES, NAMES.map(lambda name: "*." + name)).map(str.lower)
ADDRESSES = st.sampled_from(["10.1.1.1", "192.0.2.9", "fd00::1", "2001:db8::53"])


def reference_outcome(name: str, rewrite: dict[str, str], block: list[str]):
    """The rules as written in the contract, naively: block first, then the first rewrite."""
    name = name.lower().rstrip(".")

    def matches(pattern: str) -> bool:
        return name.endswith(pattern[1:]) if pattern.startswith("*.") else name == pattern

    if any(matches(p) for p in block):
        return BLOCKED, None
    for pattern, address in rewrite.items():
        if matches(pattern):
            return REWRITTEN, address
    return UNMATCHED, None


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(data):
    outcome, out = run(data, SKIN)
    assert outcome in OUTCOMES
    assert (out is not None) == (outcome in (REWRITTEN, BLOCKED))


WILDCARD_ALL = compile_dns({"*.com": "10.1.1.1", "*.test": "fd00::1"}, ["*.b"], 60, 0)


@FAST
@given(st.binary(max_size=120), st.booleans())
def test_arbitrary_dns_payload_in_a_valid_wrapper_never_raises(message, v6):
    raw = wrap6(message) if v6 else wrap4(message)
    outcome, out = run(raw, WILDCARD_ALL)
    assert outcome in OUTCOMES
    if out is not None:
        check_framing(raw, out)


@FAST
@given(
    st.sampled_from(["www.example.com", "a.b.test", "x.com"]),
    st.lists(st.tuples(st.integers(12, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.booleans(),
)
def test_damaged_answers_never_raise_and_rebuilt_packets_stay_well_framed(name, flips, v6):
    message = bytearray(upstream_answer(name, edns=EDNS0(udp_len=1232)))
    for offset, value in flips:
        if offset < len(message):
            message[offset] = value
    raw = wrap6(bytes(message)) if v6 else wrap4(bytes(message))
    outcome, out = run(raw, WILDCARD_ALL)
    assert outcome in OUTCOMES
    if out is not None:
        check_framing(raw, out)


@FAST
@given(
    name=NAMES,
    trailing_dot=st.booleans(),
    qtype=st.sampled_from(["A", "AAAA", "MX", "TXT"]),
    rewrite=st.dictionaries(PATTERNS, ADDRESSES, max_size=4),
    block=st.lists(PATTERNS, max_size=2),
    msg_id=st.integers(0, 0xFFFF),
    ra=st.booleans(),
    edns_size=st.none() | st.integers(512, 4096),
    v6=st.booleans(),
)
def test_answers_follow_the_first_matching_pattern(
    name, trailing_dot, qtype, rewrite, block, msg_id, ra, edns_size, v6
):
    dns = compile_dns(rewrite, block, 77, 0)
    edns = None if edns_size is None else EDNS0(udp_len=edns_size)
    message = upstream_answer(name + "." * trailing_dot, qtype, msg_id=msg_id, ra=ra, edns=edns)
    raw = wrap6(message) if v6 else wrap4(message)
    expected, address = reference_outcome(name, rewrite, block)

    outcome, out = run(raw, dns)
    assert outcome == expected
    if expected == UNMATCHED:
        assert out is None
        return
    reply = DNSRecord.parse(check_framing(raw, out))
    header = reply.header
    assert (header.id, header.qr, header.aa, header.ra) == (msg_id, 1, 0, ra)
    assert [(str(q.qname).rstrip("."), QTYPE[q.qtype]) for q in reply.questions] == [(name, qtype)]
    assert reply.auth == []
    expected_ar = [] if edns is None else [(QTYPE.OPT, edns_size)]
    assert [(r.rtype, r.rclass) for r in reply.ar] == expected_ar
    if expected == BLOCKED:
        assert (reply.header.rcode, reply.rr) == (3, [])
        return
    assert reply.header.rcode == 0
    family = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
    if qtype != family:
        assert reply.rr == []
        return
    assert len(reply.rr) == 1
    record = reply.rr[0]
    assert (QTYPE[record.rtype], record.ttl) == (family, 77)
    assert ipaddress.ip_address(str(record.rdata)) == ipaddress.ip_address(address)


# --- the answer chain: aliases cannot sidestep a pattern --------------------------------------

CHAIN_SKIN = compile_dns(
    {"www.rewritten.test": "198.51.100.7", "*.v6.test": "fd00::7", "*.late.test": "192.0.2.66"},
    ["*.blocked.test"],
    ttl=30,
)


def cname_answer(question: str, chain: list[str], qtype: str = "A", final: str = "1.2.3.4", **kw) -> bytes:
    """question CNAME chain[0], chain[0] CNAME chain[1], …, chain[-1] A final (as resolvers send it)."""
    records = []
    owner = question
    for target in chain:
        records.append(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=300))
        owner = target
    if qtype == "A":
        records.append(RR(owner, QTYPE.A, rdata=A(final), ttl=300))
    return upstream_answer(question, qtype, records=tuple(records), **kw)


@pytest.mark.parametrize("wrap", [wrap4, wrap6])
@pytest.mark.parametrize("chain", [["tracker.blocked.test"], ["hop.example.org", "deep.tracker.blocked.test"]])
def test_a_blocked_alias_anywhere_in_the_chain_blocks_the_whole_answer(wrap, chain):
    raw = wrap(cname_answer("www.example.org", chain, msg_id=99))
    reply = rewritten_message(raw, CHAIN_SKIN, expected=BLOCKED)
    assert (reply.header.id, reply.header.rcode) == (99, 3)
    assert [str(q.qname) for q in reply.questions] == ["www.example.org."]
    assert reply.rr == [] and reply.auth == [] and reply.ar == []


def test_a_rewritten_alias_gets_the_rewrite_for_the_question_name():
    raw = wrap4(cname_answer("cdn.example.org", ["edge.example.net", "www.rewritten.test"]))
    reply = rewritten_message(raw, CHAIN_SKIN)
    assert [(str(r.rname), QTYPE[r.rtype], str(r.rdata), r.ttl) for r in reply.rr] == [
        ("cdn.example.org.", "A", "198.51.100.7", 30)
    ]
    # The other family gets NODATA, so the real address behind the alias never leaks.
    aaaa = wrap4(cname_answer("cdn.example.org", ["www.rewritten.test"], qtype="AAAA"))
    assert rewritten_message(aaaa, CHAIN_SKIN).rr == []


def test_block_anywhere_wins_over_a_rewrite_earlier_in_the_chain():
    raw = wrap4(cname_answer("www.rewritten.test", ["x.blocked.test"]))
    assert rewritten_message(raw, CHAIN_SKIN, expected=BLOCKED).header.rcode == 3


def test_the_first_rewrite_in_chain_order_picks_the_address_not_skin_order():
    # *.v6.test comes before *.late.test in the skin, but the chain meets a.late.test first.
    raw = wrap4(cname_answer("www.example.org", ["a.late.test", "b.v6.test"]))
    assert [str(r.rdata) for r in rewritten_message(raw, CHAIN_SKIN).rr] == ["192.0.2.66"]
    raw6 = wrap6(cname_answer("www.example.org", ["b.v6.test", "a.late.test"], qtype="AAAA"))
    assert [str(r.rdata) for r in rewritten_message(raw6, CHAIN_SKIN).rr] == ["fd00::7"]


def test_a_dname_target_and_an_unlinked_owner_are_judged_too():
    dname = RR("example.org", QTYPE.DNAME, rdata=CNAME("dn.blocked.test"), ttl=60)
    raw = wrap4(upstream_answer("www.example.org", records=(dname,)))
    assert run(raw, CHAIN_SKIN)[0] == BLOCKED
    stray = RR("ads.blocked.test", QTYPE.A, rdata=A("1.2.3.4"), ttl=60)
    raw = wrap4(upstream_answer("www.example.org", records=(stray,)))
    assert run(raw, CHAIN_SKIN)[0] == BLOCKED


def test_names_in_authority_and_additional_are_not_the_answer():
    extra = RR("x.blocked.test", QTYPE.A, rdata=A("1.2.3.4"), ttl=60)
    message = upstream_answer("www.example.org", authority=(extra,))
    assert run(wrap4(message), CHAIN_SKIN) == (UNMATCHED, None)


def multi_question_answer(questions: list[tuple[str, str]], records: tuple[RR, ...] = ()) -> bytes:
    reply = DNSRecord(DNSHeader(id=5, qr=1, ra=1, rd=1))
    for name, qtype in questions:
        reply.add_question(DNSRecord.question(name, qtype).q)
    for record in records:
        reply.add_answer(record)
    return reply.pack()


def test_every_question_is_judged_and_echoed():
    blocked = multi_question_answer([("www.example.org", "A"), ("t.blocked.test", "A")])
    reply = rewritten_message(wrap4(blocked), CHAIN_SKIN, expected=BLOCKED)
    assert [str(q.qname) for q in reply.questions] == ["www.example.org.", "t.blocked.test."]
    rewritten = multi_question_answer([("www.example.org", "A"), ("www.rewritten.test", "A"), ("x.org", "MX")])
    reply = rewritten_message(wrap4(rewritten), CHAIN_SKIN)
    assert len(reply.questions) == 3
    # Each question of the rewrite's family gets the address under its own name.
    assert [(str(r.rname), str(r.rdata)) for r in reply.rr] == [
        ("www.example.org.", "198.51.100.7"),
        ("www.rewritten.test.", "198.51.100.7"),
    ]


def hand_message(question: bytes, answers: bytes, ancount: int, qdcount: int = 1) -> bytes:
    return struct.pack("!6H", 0x4242, 0x8180, qdcount, ancount, 0, 0) + question + answers


QUESTION_WWW = b"\x03www\x07example\x03org\x00" + struct.pack("!HH", 1, 1)  # at offset 12


def test_compression_pointers_are_followed_forward_and_backward():
    # The CNAME target is "tracker" + a pointer *forward* to "blocked.test" written later.
    # dnslib refuses forward pointers, but lenient stub resolvers follow them, so an alias
    # must not hide behind one.
    target_rdata = b"\x07tracker\xc0\x00"  # the pointer's offset is patched below
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, len(target_rdata)) + target_rdata
    a_owner_offset = 12 + len(QUESTION_WWW) + len(cname)
    a_record = b"\x07blocked\x04test\x00" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([1, 2, 3, 4])
    pointer = struct.pack("!H", 0xC000 | a_owner_offset)
    cname = cname[:-2] + pointer
    message = hand_message(QUESTION_WWW, cname + a_record, 2)
    assert run(wrap4(message), CHAIN_SKIN)[0] == BLOCKED


@pytest.mark.parametrize(
    "owner",
    [
        b"\xc0\x00",  # points into the header
        b"\x01a\xc0\x00",  # label then a pointer to the pointer itself: patched below
        b"\x40abc\x00",  # extended label type
        b"\x3f" + b"a" * 10,  # label running past the message
    ],
)
def test_pointer_loops_and_bad_labels_in_the_answer_pass_as_malformed(owner):
    owner_offset = 12 + len(QUESTION_WWW)
    if owner == b"\x01a\xc0\x00":
        owner = b"\x01a" + struct.pack("!H", 0xC000 | owner_offset)  # a.a.a.a… forever
    record = owner + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    assert run(wrap4(hand_message(QUESTION_WWW, record, 1)), CHAIN_SKIN) == (MALFORMED, None)


def test_a_self_pointer_loop_ends():
    loop_offset = 12 + len(QUESTION_WWW)
    record = struct.pack("!H", 0xC000 | loop_offset) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    assert run(wrap4(hand_message(QUESTION_WWW, record, 1)), CHAIN_SKIN) == (MALFORMED, None)


def test_damage_after_a_match_still_applies_the_match():
    question = b"\x01x\x07blocked\x04test\x00" + struct.pack("!HH", 1, 1)
    damaged = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 40) + b"\x03abc"  # rdata past the end
    assert run(wrap4(hand_message(question, damaged, 1)), CHAIN_SKIN)[0] == BLOCKED
    assert run(wrap4(hand_message(QUESTION_WWW, damaged, 1)), CHAIN_SKIN) == (MALFORMED, None)
    # A CNAME whose target does not fill its record data is damage too.
    short = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 8) + b"\x01a\xc0\x0c" + b"\0\0\0\0"
    assert run(wrap4(hand_message(QUESTION_WWW, short, 1)), CHAIN_SKIN) == (MALFORMED, None)


def test_a_dot_inside_a_label_cannot_pose_as_a_boundary():
    # One label "x.blocked" under "test": not below blocked.test.
    question = b"\x09x.blocked\x04test\x00" + struct.pack("!HH", 1, 1)
    assert run(wrap4(hand_message(question, b"", 0)), CHAIN_SKIN) == (UNMATCHED, None)
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 16) + b"\x09a.blocked\x04test\x00"
    assert run(wrap4(hand_message(QUESTION_WWW, cname, 1)), CHAIN_SKIN) == (UNMATCHED, None)


# Random chains: names from a small alphabet so that patterns and aliases often collide.
CHAIN_NAMES = st.lists(st.sampled_from(["a", "cdn", "www", "blocked", "late", "test", "net"]), min_size=1, max_size=4).map(".".join)


def chain_reference(names: list[str], rewrite: dict[str, str], block: list[str]):
    """The contract, naively: block anywhere in the chain; else the first name with a rewrite."""
    outcomes = [reference_outcome(name, rewrite, block) for name in names]
    if any(outcome == BLOCKED for outcome, _ in outcomes):
        return BLOCKED, None
    for outcome, address in outcomes:
        if outcome == REWRITTEN:
            return REWRITTEN, address
    return UNMATCHED, None


@FAST
@given(
    question=CHAIN_NAMES,
    chain=st.lists(CHAIN_NAMES, max_size=5),
    qtype=st.sampled_from(["A", "AAAA"]),
    rewrite=st.dictionaries(CHAIN_NAMES.map(lambda n: "*." + n) | CHAIN_NAMES, ADDRESSES, max_size=3),
    block=st.lists(CHAIN_NAMES.map(lambda n: "*." + n) | CHAIN_NAMES, max_size=2),
    v6=st.booleans(),
)
def test_random_cname_chains_follow_the_chain_rules(question, chain, qtype, rewrite, block, v6):
    dns = compile_dns(rewrite, block, 11, 0)
    raw = (wrap6 if v6 else wrap4)(cname_answer(question, chain, qtype=qtype))
    expected, address = chain_reference([question, *chain], rewrite, block)
    outcome, out = run(raw, dns)
    assert outcome == expected
    if expected == UNMATCHED:
        assert out is None
        return
    reply = DNSRecord.parse(check_framing(raw, out))
    assert [str(q.qname).rstrip(".") for q in reply.questions] == [question]
    if expected == BLOCKED:
        assert (reply.header.rcode, reply.rr) == (3, [])
        return
    family = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
    assert [(str(r.rname).rstrip("."), QTYPE[r.rtype], ipaddress.ip_address(str(r.rdata))) for r in reply.rr] == (
        [(question, family, ipaddress.ip_address(address))] if qtype == family else []
    )


@FAST
@given(
    question=CHAIN_NAMES,
    chain=st.lists(CHAIN_NAMES, min_size=1, max_size=5),
    blocked_at=st.integers(0, 5),
)
def test_a_blocked_name_anywhere_in_a_random_chain_gives_nxdomain(question, chain, blocked_at):
    names = [question, *chain]
    names[min(blocked_at, len(names) - 1)] = "ads.blocked.example"
    raw = wrap4(cname_answer(names[0], names[1:]))
    dns = compile_dns({"*.test": "10.1.1.1", "*.net": "10.2.2.2"}, ["*.blocked.example"], 60, 0)
    reply = rewritten_message(raw, dns, expected=BLOCKED)
    assert reply.header.rcode == 3 and reply.rr == []


@FAST
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=8).map(lambda b: bytes([len(b)]) + b),  # a label
            st.integers(0, 0x3FFF).map(lambda o: struct.pack("!H", 0xC000 | o)),  # a pointer
            st.just(b"\0"),
            st.binary(max_size=10),  # type/class/ttl/rdlength or junk
        ),
        max_size=30,
    ),
    st.integers(0, 8),
    st.integers(1, 3),
)
def test_random_labels_and_pointers_never_raise(pieces, ancount, qdcount):
    message = hand_message(b"", b"".join(pieces), ancount, qdcount)
    for dns in (CHAIN_SKIN, WILDCARD_ALL):
        outcome, out = run(wrap4(message), dns)
        assert outcome in OUTCOMES
        if out is not None:
            DNSRecord.parse(check_framing(wrap4(message), out))
