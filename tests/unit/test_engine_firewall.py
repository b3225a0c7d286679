"""The firewall stage: stateful verdicts, related traffic, timeouts and eviction in virtual time."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.engine import firewall as fw
from interceptor.engine.firewall import (
    ALLOW,
    CLOSING,
    DROP,
    ESTABLISHED,
    OPENING,
    REJECT,
    CompiledProfile,
    Firewall,
    FlowTable,
)
from interceptor.packet import (
    MALFORMED,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Header,
    parse,
)
from interceptor.profiles import compile_profile, load_profile, profile_dirs, validate_profile

S = fw.NS_PER_S
VM = bytes([10, 77, 1, 2])
REMOTE = bytes([198, 51, 100, 7])
VM6 = ipaddress.IPv6Address("fd00:77::2").packed
REMOTE6 = ipaddress.IPv6Address("2001:db8::7").packed
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


# --- packets, built byte by byte and read by the real parser ---------------------------------


def tcp(sport: int, dport: int, flags: int) -> tuple[int, bytes]:
    return PROTO_TCP, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int, data: bytes = b"") -> tuple[int, bytes]:
    return PROTO_UDP, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def icmp(icmp_type: int, code: int = 0, data: bytes = b"", v6: bool = False) -> tuple[int, bytes]:
    proto = PROTO_ICMPV6 if v6 else PROTO_ICMP
    return proto, struct.pack("!BBHI", icmp_type, code, 0, 0) + data


def ip(src: bytes, dst: bytes, l4: tuple[int, bytes], frag_offset: int = 0) -> bytes:
    proto, body = l4
    if len(src) == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, frag_offset, 64, proto, 0, src, dst
        )
        return header + body
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, 64, src, dst) + body


def out(firewall: Firewall, l4: tuple[int, bytes], now_ns: int = 0, v6: bool = False) -> str:
    """The verdict on a packet leaving the VM for the remote peer."""
    raw = ip(VM6, REMOTE6, l4) if v6 else ip(VM, REMOTE, l4)
    return firewall.judge(parse(raw), raw, True, now_ns)


def into(firewall: Firewall, l4: tuple[int, bytes], now_ns: int = 0, v6: bool = False) -> str:
    """The verdict on a packet from the remote peer to the VM."""
    raw = ip(REMOTE6, VM6, l4) if v6 else ip(REMOTE, VM, l4)
    return firewall.judge(parse(raw), raw, False, now_ns)


def profile(*rules: dict, default_in: str = "drop", default_out: str = "allow") -> CompiledProfile:
    model = validate_profile({"default_in": default_in, "default_out": default_out, "rules": list(rules)})
    return compile_profile(model, "test")


def shipped(name: str) -> CompiledProfile:
    return load_profile(name, profile_dirs(None))


@pytest.fixture(autouse=True)
def _shipped_rules(monkeypatch):
    monkeypatch.delenv("NETSKIN_RULES_DIR", raising=False)


# --- 1. no profile ----------------------------------------------------------------------------


def test_without_a_profile_everything_passes_and_nothing_is_tracked():
    firewall = Firewall()
    assert into(firewall, tcp(1234, 25, SYN)) is ALLOW
    assert out(firewall, udp(5000, 53)) is ALLOW
    assert firewall.judge(parse(b"\x45"), b"\x45", False, 0) is ALLOW
    snap = firewall.snapshot()
    assert snap["profile"] is None and snap["flows"] == 0 and snap["rules"] == []
    assert snap["default_hits"] == {"in": 0, "out": 0}
    assert snap["established"] == snap["related"] == 0


# --- 2. established flows ----------------------------------------------------------------------


def test_replies_to_connections_the_vm_opened_are_allowed():
    firewall = Firewall(shipped("restricted"))
    assert out(firewall, tcp(40000, 443, SYN)) is ALLOW
    assert firewall.flows == 1
    assert into(firewall, tcp(443, 40000, SYN | ACK)) is ALLOW
    assert out(firewall, tcp(40000, 443, ACK)) is ALLOW
    assert into(firewall, tcp(443, 40000, PSH | ACK)) is ALLOW
    assert firewall.established == 3 and firewall.default_hits == {"in": 0, "out": 1}
    # The same remote port towards another VM port is not that connection.
    assert into(firewall, tcp(443, 40001, PSH | ACK)) is DROP


def test_an_allowed_incoming_connection_opens_a_flow_for_both_directions():
    firewall = Firewall(shipped("restricted"))
    assert into(firewall, tcp(51000, 22, SYN)) is ALLOW
    assert firewall.hits == [1]
    assert out(firewall, tcp(22, 51000, SYN | ACK)) is ALLOW
    assert into(firewall, tcp(51000, 22, ACK)) is ALLOW
    assert firewall.hits == [1] and firewall.established == 2


def test_new_incoming_connections_follow_the_rules():
    firewall = Firewall(shipped("standard"))
    for port in (22, 80, 443):
        assert into(firewall, tcp(50000, port, SYN)) is ALLOW
    for port in (21, 25, 8080):
        assert into(firewall, tcp(50000, port, SYN)) is DROP
    assert into(firewall, udp(50000, 53)) is DROP
    assert into(firewall, icmp(8)) is DROP
    assert firewall.hits == [3] and firewall.default_hits == {"in": 5, "out": 0}
    assert firewall.flows == 3


def test_an_incoming_segment_without_syn_is_judged_by_the_rules_but_opens_no_flow():
    firewall = Firewall(shipped("restricted"))
    assert into(firewall, tcp(50000, 80, ACK)) is DROP
    assert into(firewall, tcp(50000, 22, ACK)) is ALLOW
    assert into(firewall, tcp(50000, 22, SYN | ACK)) is ALLOW
    assert firewall.flows == 0


def test_a_connection_up_before_the_profile_is_picked_up_by_the_vms_next_segment():
    firewall = Firewall(shipped("restricted"))
    # The reply to a connection the firewall never saw open is not let in on its own...
    assert into(firewall, tcp(443, 40000, PSH | ACK)) is DROP
    # ...but once the VM sends on it (allowed out), the flow is adopted, as conntrack does.
    assert out(firewall, tcp(40000, 443, PSH | ACK)) is ALLOW
    assert firewall.flows == 1
    assert into(firewall, tcp(443, 40000, PSH | ACK)) is ALLOW
    # A SYN-ACK the VM sends answers a SYN that was let in; it adopts nothing by itself.
    assert out(firewall, tcp(8080, 50001, SYN | ACK)) is ALLOW
    assert firewall.flows == 1


def test_udp_and_icmp_replies_are_allowed_and_requests_in_are_not():
    firewall = Firewall(shipped("restricted"))
    assert out(firewall, udp(5353, 53)) is ALLOW
    assert into(firewall, udp(53, 5353)) is ALLOW
    assert into(firewall, udp(53, 5354)) is DROP
    assert out(firewall, icmp(8)) is ALLOW  # echo request
    assert into(firewall, icmp(0)) is ALLOW  # echo reply
    assert out(firewall, icmp(128, v6=True), v6=True) is ALLOW
    assert into(firewall, icmp(129, v6=True), v6=True) is ALLOW
    assert firewall.flows == 3 and firewall.established == 3
    fresh = Firewall(shipped("restricted"))
    assert into(fresh, icmp(8)) is DROP
    assert into(fresh, icmp(128, v6=True), v6=True) is DROP


def test_other_protocols_get_a_flow_per_address_pair():
    gre = (47, b"\x00" * 4)
    firewall = Firewall(shipped("restricted"))
    assert into(firewall, gre) is DROP
    assert out(firewall, gre) is ALLOW
    assert into(firewall, gre) is ALLOW
    assert firewall.table.entries[(47, VM, REMOTE)].timeout_ns == fw.OTHER_TIMEOUT_NS


def test_established_connections_survive_a_profile_swap_and_hit_counters_restart():
    firewall = Firewall(shipped("standard"))
    assert into(firewall, tcp(50000, 80, SYN)) is ALLOW
    assert out(firewall, tcp(80, 50000, SYN | ACK)) is ALLOW
    assert firewall.hits == [1]
    firewall.profile = profile(default_in="drop", default_out="drop")
    assert firewall.hits == [] and firewall.default_hits == {"in": 0, "out": 0}
    assert into(firewall, tcp(50000, 80, ACK)) is ALLOW
    assert out(firewall, tcp(80, 50000, PSH | ACK)) is ALLOW
    assert into(firewall, tcp(50001, 80, SYN)) is DROP
    assert out(firewall, tcp(40000, 443, SYN)) is DROP
    assert firewall.default_hits == {"in": 1, "out": 1}
    assert firewall.flows == 1
    firewall.profile = None
    assert into(firewall, tcp(50001, 80, SYN)) is ALLOW
    assert firewall.flows == 1


# --- 3. related traffic ------------------------------------------------------------------------


def test_a_rst_is_always_allowed_and_opens_no_flow():
    firewall = Firewall(shipped("restricted"))
    assert into(firewall, tcp(50000, 80, RST)) is ALLOW
    assert out(firewall, tcp(80, 50000, RST | ACK)) is ALLOW
    assert firewall.related == 2 and firewall.flows == 0
    assert firewall.default_hits == {"in": 0, "out": 0}


def _quoted(packet: bytes) -> bytes:
    # Routers quote the IP header and the first 8 bytes of the offending packet (RFC 792).
    header_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    return packet[: header_len + 8]


def test_icmp_errors_about_a_known_flow_are_related():
    firewall = Firewall(shipped("restricted"))
    sent = ip(VM, REMOTE, udp(5000, 33434))
    assert firewall.judge(parse(sent), sent, True, 0) is ALLOW
    # Port unreachable from the remote, and time exceeded from a router on the way.
    assert into(firewall, icmp(3, 3, _quoted(sent))) is ALLOW
    router = bytes([192, 0, 2, 1])
    raw = ip(router, VM, icmp(11, 0, _quoted(sent)))
    assert firewall.judge(parse(raw), raw, False, 0) is ALLOW
    assert firewall.related == 2 and firewall.flows == 1


def test_icmpv6_errors_about_a_known_flow_are_related():
    firewall = Firewall(shipped("restricted"))
    sent = ip(VM6, REMOTE6, tcp(40000, 443, SYN))
    assert firewall.judge(parse(sent), sent, True, 0) is ALLOW
    for icmp_type in (1, 2, 3, 4):
        assert into(firewall, icmp(icmp_type, 0, _quoted(sent), v6=True), v6=True) is ALLOW
    assert firewall.related == 4


def test_the_vm_may_send_errors_about_connections_it_accepted():
    firewall = Firewall(profile({"direction": "in", "proto": "udp", "ports": [53], "action": "allow"},
                                default_out="drop"))
    received = ip(REMOTE, VM, udp(5000, 53))
    assert firewall.judge(parse(received), received, False, 0) is ALLOW
    assert out(firewall, icmp(3, 3, _quoted(received))) is ALLOW
    assert out(firewall, icmp(3, 3, _quoted(ip(REMOTE, VM, udp(5000, 54))))) is DROP
    assert firewall.related == 1


def test_an_icmp_error_about_no_known_flow_is_judged_by_the_rules_and_opens_no_flow():
    stray = _quoted(ip(VM, REMOTE, udp(5000, 9999)))
    restricted = Firewall(shipped("restricted"))
    assert into(restricted, icmp(3, 3, stray)) is DROP
    assert restricted.default_hits["in"] == 1
    opened = Firewall(shipped("open"))
    assert into(opened, icmp(3, 3, stray)) is ALLOW
    assert into(opened, icmp(3, 3, b"\x45")) is ALLOW  # a quote too short to parse
    assert opened.flows == 0 and opened.related == 0


def test_neighbour_discovery_always_passes():
    firewall = Firewall(profile(default_in="drop", default_out="drop"))
    for icmp_type in (133, 134, 135, 136, 137):
        assert into(firewall, icmp(icmp_type, v6=True), v6=True) is ALLOW
        assert out(firewall, icmp(icmp_type, v6=True), v6=True) is ALLOW
    assert firewall.flows == 0 and firewall.related == 10
    # Only as ICMPv6: the same type numbers over ICMPv4 mean nothing special.
    assert into(firewall, icmp(135)) is DROP


def test_a_non_first_fragment_is_allowed_and_a_first_fragment_is_judged():
    firewall = Firewall(shipped("restricted"))
    middle = ip(REMOTE, VM, udp(5000, 9999), frag_offset=185)
    assert firewall.judge(parse(middle), middle, False, 0) is ALLOW
    first = ip(REMOTE, VM, udp(5000, 9999), frag_offset=0x2000)  # MF set, offset 0
    assert firewall.judge(parse(first), first, False, 0) is DROP
    assert firewall.related == 1 and firewall.flows == 0


# --- 4. new packets: first match ---------------------------------------------------------------


def test_the_first_matching_rule_decides():
    firewall = Firewall(
        profile(
            {"direction": "in", "proto": "tcp", "ports": [22], "cidr": "192.0.2.0/24", "action": "reject"},
            {"direction": "in", "proto": "tcp", "ports": ["20-25"], "action": "allow"},
            {"direction": "in", "proto": "any", "cidr": "2001:db8::/32", "action": "allow"},
            {"direction": "out", "proto": "udp", "ports": [53], "action": "allow"},
            {"direction": "out", "proto": "any", "action": "reject"},
        )
    )
    blocked = ip(bytes([192, 0, 2, 9]), VM, tcp(50000, 22, SYN))
    assert firewall.judge(parse(blocked), blocked, False, 0) is REJECT
    assert into(firewall, tcp(50000, 22, SYN)) is ALLOW  # REMOTE is outside 192.0.2.0/24
    assert into(firewall, tcp(50000, 26, SYN)) is DROP
    assert into(firewall, udp(50000, 7), v6=True) is ALLOW  # REMOTE6 is in 2001:db8::/32
    assert out(firewall, udp(5000, 53)) is ALLOW
    assert out(firewall, tcp(40000, 53, SYN)) is REJECT
    assert firewall.hits == [1, 1, 1, 1, 1]
    assert firewall.default_hits == {"in": 1, "out": 0}
    assert firewall.flows == 3  # rejected and dropped packets open nothing


def test_a_v4_network_never_matches_a_v6_peer_and_the_reverse():
    firewall = Firewall(
        profile(
            {"direction": "in", "proto": "any", "cidr": "0.0.0.0/0", "action": "allow"},
            {"direction": "out", "proto": "any", "cidr": "::/0", "action": "allow"},
            default_out="drop",
        )
    )
    assert into(firewall, udp(1, 2)) is ALLOW
    assert into(firewall, udp(1, 2), v6=True) is DROP
    assert out(firewall, udp(3, 4), v6=True) is ALLOW
    assert out(firewall, udp(3, 4)) is DROP


def test_malformed_packets_get_the_default_of_their_direction():
    firewall = Firewall(profile({"direction": "in", "proto": "any", "action": "allow"}, default_in="reject",
                                default_out="drop"))
    truncated = ip(REMOTE, VM, tcp(1, 22, SYN))[:22]
    assert parse(truncated).proto == MALFORMED
    assert firewall.judge(parse(truncated), truncated, False, 0) is REJECT
    assert firewall.judge(parse(b""), b"", True, 0) is DROP
    assert firewall.hits == [0] and firewall.default_hits == {"in": 1, "out": 1}
    assert firewall.flows == 0


# --- TCP states and timeouts in virtual time ----------------------------------------------------


def test_tcp_moves_from_opening_to_established_to_closing():
    firewall = Firewall(shipped("restricted"))
    key = (PROTO_TCP, VM, 40000, REMOTE, 443)
    out(firewall, tcp(40000, 443, SYN))
    flow = firewall.table.entries[key]
    assert (flow.state, flow.timeout_ns) == (OPENING, 30 * S)
    out(firewall, tcp(40000, 443, SYN), now_ns=1 * S)  # a retransmission is no answer
    assert flow.state == OPENING
    into(firewall, tcp(443, 40000, SYN | ACK), now_ns=2 * S)
    assert (flow.state, flow.timeout_ns) == (ESTABLISHED, 300 * S)
    out(firewall, tcp(40000, 443, FIN | ACK), now_ns=3 * S)
    assert (flow.state, flow.timeout_ns) == (CLOSING, 30 * S)
    assert into(firewall, tcp(443, 40000, ACK), now_ns=4 * S) is ALLOW
    assert flow.state == CLOSING


def test_an_unanswered_syn_is_forgotten_after_30_seconds():
    firewall = Firewall(shipped("restricted"))
    out(firewall, tcp(40000, 443, SYN), now_ns=0)
    assert into(firewall, tcp(443, 40000, SYN | ACK), now_ns=30 * S) is DROP
    assert firewall.flows == 0 and firewall.table.expired == 1


def test_an_established_connection_lives_300_idle_seconds_from_its_last_packet():
    firewall = Firewall(shipped("restricted"))
    out(firewall, tcp(40000, 443, SYN), now_ns=0)
    into(firewall, tcp(443, 40000, SYN | ACK), now_ns=1)
    # Keepalives every 299 s keep it up for as long as they come.
    for n in range(1, 5):
        assert into(firewall, tcp(443, 40000, ACK), now_ns=1 + n * 299 * S) is ALLOW
    last = 1 + 4 * 299 * S
    assert into(firewall, tcp(443, 40000, ACK), now_ns=last + 300 * S - 1) is ALLOW
    assert into(firewall, tcp(443, 40000, ACK), now_ns=last + 600 * S - 1) is DROP


def test_a_closed_connection_is_forgotten_30_seconds_after_its_last_packet():
    firewall = Firewall(shipped("restricted"))
    out(firewall, tcp(40000, 443, SYN), now_ns=0)
    into(firewall, tcp(443, 40000, SYN | ACK), now_ns=0)
    into(firewall, tcp(443, 40000, RST), now_ns=10 * S)
    assert into(firewall, tcp(443, 40000, ACK), now_ns=40 * S - 1) is ALLOW
    assert into(firewall, tcp(443, 40000, ACK), now_ns=70 * S - 1) is DROP


def test_a_syn_reusing_the_ports_of_a_closing_flow_is_a_new_connection():
    firewall = Firewall(shipped("restricted"))
    into(firewall, tcp(50000, 22, SYN))
    out(firewall, tcp(22, 50000, SYN | ACK))
    into(firewall, tcp(50000, 22, FIN | ACK))
    firewall.profile = profile()  # SSH no longer allowed in
    assert into(firewall, tcp(50000, 22, ACK)) is ALLOW  # the old connection finishes
    assert into(firewall, tcp(50000, 22, SYN)) is DROP  # a new one is judged afresh


@pytest.mark.parametrize(
    ("l4", "timeout_s"),
    [(udp(5000, 53), 60), (icmp(8), 30)],
    ids=["udp", "icmp"],
)
def test_udp_and_icmp_flows_expire_after_their_idle_timeout(l4, timeout_s):
    reply = udp(53, 5000) if l4[0] == PROTO_UDP else icmp(0)
    firewall = Firewall(shipped("restricted"))
    out(firewall, l4, now_ns=0)
    assert into(firewall, reply, now_ns=timeout_s * S - 1) is ALLOW
    assert into(firewall, reply, now_ns=2 * timeout_s * S - 2) is ALLOW
    assert into(firewall, reply, now_ns=3 * timeout_s * S - 2) is DROP
    assert firewall.table.expired == 1


def test_expire_sweeps_every_timed_out_flow():
    firewall = Firewall(shipped("restricted"))
    out(firewall, udp(5000, 53), now_ns=0)
    out(firewall, icmp(8), now_ns=0)
    out(firewall, tcp(40000, 443, SYN), now_ns=0)
    into(firewall, tcp(443, 40000, SYN | ACK), now_ns=0)
    assert firewall.expire(31 * S) == 1  # the ICMP flow
    assert firewall.expire(61 * S) == 1  # the UDP flow
    assert firewall.expire(299 * S) == 0
    assert firewall.flows == 1 and firewall.snapshot()["expired"] == 2


# --- the bounded table ------------------------------------------------------------------------


def test_a_full_table_evicts_a_flow_not_used_since_it_was_added():
    firewall = Firewall(shipped("restricted"), max_flows=3)
    for port in (1001, 1002, 1003):
        out(firewall, udp(port, 53), now_ns=0)
    assert into(firewall, udp(53, 1001), now_ns=1) is ALLOW  # 1001 is in use
    out(firewall, udp(1004, 53), now_ns=2)
    assert firewall.flows == 3 and firewall.evicted == 1
    assert into(firewall, udp(53, 1002), now_ns=3) is DROP  # the least recently used went
    for port in (1001, 1003, 1004):
        assert into(firewall, udp(53, port), now_ns=3) is ALLOW


def test_flows_in_use_outlive_a_flood_of_new_ones():
    firewall = Firewall(shipped("open"), max_flows=64)
    out(firewall, tcp(40000, 443, SYN), now_ns=0)
    into(firewall, tcp(443, 40000, SYN | ACK), now_ns=0)
    for n in range(10_000):
        into(firewall, udp(n % 65535 + 1, 9), now_ns=n)
        if n % 50 == 0:
            assert into(firewall, tcp(443, 40000, ACK), now_ns=n) is ALLOW
    firewall.profile = profile()
    assert into(firewall, tcp(443, 40000, ACK), now_ns=10_000) is ALLOW
    assert firewall.flows == 64 and firewall.evicted > 9_000


def test_expired_flows_make_room_before_live_ones_are_evicted():
    firewall = Firewall(shipped("restricted"), max_flows=2)
    out(firewall, icmp(8), now_ns=0)
    out(firewall, udp(5000, 53), now_ns=0)
    out(firewall, udp(5001, 53), now_ns=40 * S)  # the ICMP flow has expired by now
    assert firewall.evicted == 0 and firewall.table.expired == 1
    assert into(firewall, udp(53, 5000), now_ns=40 * S) is ALLOW


def test_the_flow_table_needs_room_for_one():
    with pytest.raises(ValueError, match="max_flows"):
        FlowTable(0)


# --- counters ---------------------------------------------------------------------------------


def test_snapshot_is_plain_data_with_readable_rules():
    firewall = Firewall(shipped("standard"))
    into(firewall, tcp(50000, 443, SYN))
    into(firewall, tcp(50000, 443, ACK))
    into(firewall, tcp(50000, 25, SYN))
    into(firewall, tcp(50000, 25, RST))
    assert firewall.snapshot() == {
        "profile": "standard",
        "default_in": "drop",
        "default_out": "allow",
        "rules": [{"rule": "in tcp 22,80,443 any → allow", "hits": 1}],
        "default_hits": {"in": 1, "out": 0},
        "established": 1,
        "related": 1,
        "flows": 1,
        "evicted": 0,
        "expired": 0,
    }


# --- properties -------------------------------------------------------------------------------

NETWORKS = ["10.0.0.0/8", "10.77.1.0/24", "198.51.100.7", "0.0.0.0/0", "2001:db8::/32", "::/0",
            "fd00:77::2/128"]
ADDRESSES4 = [VM, REMOTE, bytes([10, 1, 2, 3]), bytes([10, 77, 1, 9]), bytes([192, 0, 2, 1])]
ADDRESSES6 = [VM6, REMOTE6, ipaddress.IPv6Address("2001:db9::1").packed]
PORTS = st.sampled_from([1, 22, 53, 80, 443, 8000, 8080, 65535]) | st.integers(1, 65535)


@st.composite
def port_specs(draw):
    if draw(st.booleans()):
        return draw(PORTS)
    lo, hi = sorted((draw(PORTS), draw(PORTS)))
    return f"{lo}-{hi}"


@st.composite
def rules(draw):
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "any"]))
    rule = {
        "direction": draw(st.sampled_from(["in", "out"])),
        "proto": proto,
        "action": draw(st.sampled_from(["allow", "drop", "reject"])),
    }
    if proto in ("tcp", "udp") and draw(st.booleans()):
        rule["ports"] = draw(st.lists(port_specs(), min_size=1, max_size=4))
    if draw(st.booleans()):
        rule["cidr"] = draw(st.sampled_from(NETWORKS))
    return rule


@st.composite
def profile_documents(draw):
    return {
        "default_in": draw(st.sampled_from(["allow", "drop", "reject"])),
        "default_out": draw(st.sampled_from(["allow", "drop", "reject"])),
        "rules": draw(st.lists(rules(), max_size=8)),
    }


@st.composite
def headers(draw):
    """Well-formed-looking headers, with the odd malformed, fragment, RST or ICMP error."""
    version = draw(st.sampled_from([4, 6]))
    pool = ADDRESSES4 if version == 4 else ADDRESSES6
    proto = draw(st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, 47, MALFORMED]))
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        sport = draw(st.sampled_from([0, 1, 3, 8, 11, 128, 135]) | st.integers(0, 255))
        dport = draw(st.integers(0, 255))
    elif proto in (PROTO_TCP, PROTO_UDP):
        sport, dport = draw(PORTS), draw(PORTS)
    else:
        sport = dport = 0
    return Header(
        version=version,
        proto=proto,
        src=draw(st.sampled_from(pool)),
        dst=draw(st.sampled_from(pool)),
        length=draw(st.integers(0, 65535)),
        l4_offset=20 if version == 4 else 40,
        sport=sport,
        dport=dport,
        tcp_flags=draw(st.integers(0, 255)) if proto == PROTO_TCP else 0,
        dont_fragment=draw(st.booleans()),
        first_fragment=draw(st.booleans() | st.just(True)),
    )


def reference(document: dict, header: Header, outgoing: bool) -> str:
    """The verdict on a packet no flow knows, written plainly from the module's doc."""
    proto = header.proto
    direction = "out" if outgoing else "in"
    default = document[f"default_{direction}"]
    if proto == MALFORMED:
        return default
    if not header.first_fragment:
        return "allow"
    if proto == PROTO_TCP and header.tcp_flags & RST:
        return "allow"
    if proto == PROTO_ICMPV6 and 133 <= header.sport <= 137:
        return "allow"
    names = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmp"}
    remote = ipaddress.ip_address(header.dst if outgoing else header.src)
    for rule in document["rules"]:
        if rule["direction"] != direction:
            continue
        if rule["proto"] != "any" and rule["proto"] != names.get(proto):
            continue
        if "ports" in rule:
            ranges = []
            for spec in rule["ports"]:
                lo, _, hi = str(spec).partition("-")
                ranges.append(range(int(lo), int(hi or lo) + 1))
            if not any(header.dport in r for r in ranges):
                continue
        if "cidr" in rule and remote not in ipaddress.ip_network(rule["cidr"]):
            continue
        return rule["action"]
    return default


def as_packet(header: Header) -> bytes:
    """Bytes consistent enough with ``header`` for the ICMP error path to read."""
    return bytes(header.l4_offset + 8) + bytes([0x45]) + bytes(40)


@settings(max_examples=300, deadline=None)
@given(profile_documents(), headers(), st.booleans())
def test_a_new_packet_gets_the_verdict_of_the_first_matching_rule(document, header, outgoing):
    firewall = Firewall(compile_profile(validate_profile(document), "p"))
    assert firewall.judge(header, as_packet(header), outgoing, 0) == reference(document, header, outgoing)


@settings(max_examples=200, deadline=None)
@given(profile_documents(), headers(), st.booleans())
def test_a_reply_to_whatever_opened_a_flow_is_allowed(document, header, outgoing):
    firewall = Firewall(compile_profile(validate_profile(document), "p"))
    before = firewall.flows
    firewall.judge(header, as_packet(header), outgoing, 0)
    if firewall.flows == before:
        return
    reply = header._replace(src=header.dst, dst=header.src, sport=header.dport, dport=header.sport,
                            tcp_flags=SYN | ACK if header.proto == PROTO_TCP else 0)
    assert firewall.judge(reply, as_packet(reply), not outgoing, 1) is ALLOW
    assert firewall.established == 1


any_header = st.builds(
    Header,
    version=st.integers(-1, 16),
    proto=st.integers(-1, 300),
    src=st.binary(max_size=17),
    dst=st.binary(max_size=17),
    length=st.integers(-1, 1 << 17),
    l4_offset=st.integers(-100, 200),
    sport=st.integers(-1, 1 << 17),
    dport=st.integers(-1, 1 << 17),
    tcp_flags=st.integers(-1, 512),
    dont_fragment=st.booleans(),
    first_fragment=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    profile_documents(),
    st.lists(
        st.tuples(
            st.one_of(headers(), any_header, st.binary(max_size=80)),
            st.binary(max_size=120),
            st.booleans(),
            st.integers(-(10**12), 10**13),
        ),
        max_size=40,
    ),
)
def test_no_input_makes_judge_raise(document, packets):
    firewall = Firewall(compile_profile(validate_profile(document), "p"), max_flows=4)
    for what, payload, outgoing, now_ns in packets:
        if isinstance(what, bytes):
            header, payload = parse(what), what
        else:
            header = what
        assert firewall.judge(header, payload, outgoing, now_ns) in (ALLOW, DROP, REJECT)
    firewall.expire(0)
    snap = firewall.snapshot()
    assert snap["flows"] <= 4 and len(snap["rules"]) == len(document["rules"])
