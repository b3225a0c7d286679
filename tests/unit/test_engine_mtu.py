"""The MTU stage: which packets are too big, and the ICMP errors built for them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, TCP, IPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import Raw

from interceptor.engine.mtu import icmp_error, too_big
from interceptor.packet import internet_checksum, parse


def test_df_packet_over_the_mtu_is_too_big_and_gets_frag_needed():
    packet = bytes(IP(src="10.77.1.2", dst="10.77.0.2", flags="DF") / UDP(sport=4000, dport=9000) / (b"x" * 1472))
    header = parse(packet)
    assert too_big(header, 1400) and not too_big(header, 1500)
    version, destination, message = icmp_error(packet, header, 1400)
    assert (version, destination) == (4, bytes([10, 77, 1, 2]))
    icmp = ICMP(message)
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1400)
    assert internet_checksum(message) == 0  # a valid checksum sums to zero
    quoted = icmp[IPerror]
    assert quoted.src == "10.77.1.2" and quoted.dst == "10.77.0.2"
    assert len(message) == 8 + 28  # header plus 8 bytes of the original


def test_packets_that_may_fragment_or_fit_are_not_too_big():
    no_df = parse(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"x" * 2000)))
    assert not too_big(no_df, 1400)
    fits = parse(bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="DF") / TCP() / (b"x" * 1000)))
    assert not too_big(fits, 1400)
    assert not too_big(parse(b"\x45garbage"), 68)


def test_ipv6_gets_packet_too_big_quoting_at_most_the_minimum_mtu():
    packet = bytes(IPv6(src="fd77:1::2", dst="fd77::2") / UDP(sport=1, dport=2) / (b"y" * 3000))
    header = parse(packet)
    assert too_big(header, 1400)
    version, destination, message = icmp_error(packet, header, 1400)
    assert version == 6 and len(destination) == 16
    error = ICMPv6PacketTooBig(message)
    assert error.mtu == 1400 and len(message) == 1280 - 40


def test_no_error_is_sent_about_an_icmp_error():
    packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="DF") / ICMP(type=3, code=1) / (b"z" * 1500))
    assert icmp_error(packet, parse(packet), 1400) is None


@given(st.binary(max_size=120), st.integers(68, 65535))
def test_any_bytes_never_raise(data, mtu):
    header = parse(data)
    too_big(header, mtu)
    error = icmp_error(data, header, mtu)
    assert error is None or (error[0] in (4, 6) and len(error[1]) in (4, 16) and len(error[2]) >= 8)


def test_raw_payload_is_quoted_unchanged():
    packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2", flags="DF", ihl=6, options=b"\x01\x01\x01\x01")
                   / UDP(sport=7, dport=8) / Raw(b"a" * 1500))
    version, _, message = icmp_error(packet, parse(packet), 1400)
    assert message[8:] == packet[:24 + 8]
