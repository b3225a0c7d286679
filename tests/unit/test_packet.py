"""The header parser: correct on real headers, never raising on garbage."""

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

from interceptor.packet import MALFORMED, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, parse


def test_ipv4_udp():
    raw = bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="DF") / UDP(sport=1234, dport=53) / (b"x" * 10))
    h = parse(raw)
    assert (h.version, h.proto, h.sport, h.dport) == (4, PROTO_UDP, 1234, 53)
    assert h.src == bytes([10, 0, 0, 1]) and h.dst == bytes([10, 0, 0, 2])
    assert h.length == len(raw) and h.dont_fragment and h.first_fragment


def test_ipv4_tcp_flags_and_options():
    raw = bytes(IP(options=b"\x01\x01\x01\x01") / TCP(sport=40000, dport=22, flags="S"))
    h = parse(raw)
    assert (h.proto, h.sport, h.dport, h.l4_offset) == (PROTO_TCP, 40000, 22, 24)
    assert h.tcp_flags == 0x02


def test_ipv4_icmp_type_code():
    h = parse(bytes(IP() / ICMP(type=8, code=0)))
    assert (h.proto, h.sport, h.dport) == (PROTO_ICMP, 8, 0)


def test_ipv4_later_fragment_has_no_ports():
    raw = bytes(IP(frag=100, proto=17) / (b"\xff" * 16))
    h = parse(raw)
    assert h.proto == PROTO_UDP and not h.first_fragment and h.sport == 0


def test_ipv6_through_extension_headers():
    raw = bytes(IPv6(src="fd77:1::2", dst="fd77::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / UDP(dport=53))
    h = parse(raw)
    assert (h.version, h.proto, h.dport) == (6, PROTO_UDP, 53)
    assert len(h.src) == 16 and h.length == len(raw)


def test_ipv6_icmp():
    h = parse(bytes(IPv6() / ICMPv6EchoRequest()))
    assert (h.proto, h.sport) == (PROTO_ICMPV6, 128)


def test_truncated_transport_is_malformed_not_an_error():
    raw = bytes(IP() / TCP())[:22]
    assert parse(raw).proto == MALFORMED
    assert parse(b"").proto == MALFORMED
    assert parse(b"\x45" * 5).proto == MALFORMED


@settings(max_examples=3000)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(data):
    h = parse(data)
    assert h.version in (0, 4, 6)


@settings(max_examples=2000)
@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60]), st.binary(max_size=90))
def test_random_bytes_behind_a_plausible_version_never_raise(first, rest):
    h = parse(bytes([first]) + rest)
    assert h.proto == MALFORMED or h.l4_offset <= len(rest) + 1
