"""The firewall stage: stateful allow/drop/reject verdicts from a VM's security profile.

Sans-IO like every stage: ``Firewall.judge`` takes a parsed header, the packet bytes, the
direction and the shell's clock reading, and returns ``ALLOW``, ``DROP`` or ``REJECT``. It never
reads a clock and never raises; the shell turns the verdict into NFQUEUE's (a reject goes back
to the kernel to be answered, see ``interceptor.rules``). Profiles are read and compiled by
``interceptor.profiles``; this module only holds their compiled form.

Theory of operation
-------------------
"in" is traffic towards the VM, "out" traffic leaving it. Each packet goes through these steps,
the first that applies decides:

1. No profile (``profile is None``): allow; nothing is tracked, nothing is counted.
2. Malformed header (``proto == MALFORMED``): the profile's default for that direction.
3. Established: the packet belongs to a known flow, in either direction: allow, and refresh the
   flow's idle timer. Flows are opened by packets the rules allowed: connections the VM opened
   (out) and new incoming connections (in). Like conntrack, the flow table outlives a profile
   swap, so connections that are up stay up whatever the new profile says about new ones.
4. Related: allowed without consulting the rules, and never opening a flow:
   - a non-first fragment (it carries no ports and cannot open a connection);
   - a TCP RST (it can only close something);
   - ICMPv6 neighbour and router discovery (types 133–137): IPv6's ARP, which must pass for
     IPv6 to work at all (RFC 4890 §4.4.1); it never leaves the link;
   - an ICMP/ICMPv6 error (v4 types 3, 4, 11, 12; v6 types 1–4) whose embedded packet belongs
     to a known flow. An error about no known flow is judged as new (step 5) but opens no flow.
5. New: the first rule of that direction whose proto, ports and cidr all match decides; when
   none does, the profile's default for that direction. An allowed packet opens a flow, except
   TCP: only a SYN without ACK opens one, or a segment the VM sends mid-stream (conntrack's
   pickup: a connection that was up before the profile came survives it). An allowed incoming
   mid-stream segment passes alone.

TCP flows move opening → established when the other side answers, and → closing on a FIN or
RST; each state has its own idle timeout (below). A SYN on a closing flow is a new connection
reusing the ports and is judged afresh. UDP, ICMP and other protocols have one state each.

The table is bounded: when full, the oldest-queued flow that has not been used since it was
queued is evicted (second-chance approximation of least-recently-used), so a flood of one-packet
flows cannot push out connections that are carrying traffic. A hit is then one dict lookup and
two attribute writes, with no reordering. Timed-out flows are forgotten when next looked up, a
few per insertion, and all at once by ``expire(now_ns)``, which the shell may call now and then.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from interceptor.packet import (
    MALFORMED,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Header,
    parse,
)

# Verdicts. Strings, so that profiles, counters and logs all read the same word. Compare with ==:
# the profile compiler hands out these very objects, so that is an identity check in practice.
ALLOW = "allow"
DROP = "drop"
REJECT = "reject"
ACTIONS = (ALLOW, DROP, REJECT)

NS_PER_S = 1_000_000_000

# Idle timeouts, much shorter than conntrack's (5 days for established TCP) because the table is
# bounded and a VM that is killed or rebooted never sends the FIN that would close its flows.
# Established TCP: 300 s, like cloud NAT gateways (350 s); long-idle sessions (SSH, databases)
# keep themselves alive with keepalives, and those refresh the flow.
TCP_ESTABLISHED_TIMEOUT_NS = 300 * NS_PER_S
# A SYN not yet answered: 30 s covers the opener's first retransmissions (1+2+4+8 s) without
# letting a SYN flood hold table entries for long.
TCP_OPENING_TIMEOUT_NS = 30 * NS_PER_S
# After a FIN or RST: long enough for the last ACKs and retransmitted FINs.
TCP_CLOSING_TIMEOUT_NS = 30 * NS_PER_S
# UDP: DNS and NTP exchanges finish in seconds; streams (QUIC, VoIP, WireGuard) send at least
# every ~25 s to keep NAT bindings open, which also keeps this flow open.
UDP_TIMEOUT_NS = 60 * NS_PER_S
# ICMP: an echo reply is back within seconds; conntrack uses 30 s too.
ICMP_TIMEOUT_NS = 30 * NS_PER_S
# Any other protocol (GRE, ESP, SCTP, ...): treated like a datagram protocol.
OTHER_TIMEOUT_NS = 60 * NS_PER_S

MAX_FLOWS = 65_536
# Flows looked at per eviction before the oldest is evicted regardless: bounds one packet's work.
_SECOND_CHANCES = 32
# Expired flows dropped from the front of the queue per insertion, so that a table nobody sweeps
# still drains.
_SWEEP_PER_ADD = 2

# TCP flow states; the tuple gives each state's idle timeout.
OPENING, ESTABLISHED, CLOSING = 0, 1, 2
_TCP_TIMEOUT_NS = (TCP_OPENING_TIMEOUT_NS, TCP_ESTABLISHED_TIMEOUT_NS, TCP_CLOSING_TIMEOUT_NS)

_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_FIN_RST = _FIN | _RST
_ICMP_ERRORS = frozenset({3, 4, 11, 12})  # unreachable, source quench, time exceeded, parameter
_ICMPV6_ERRORS = frozenset({1, 2, 3, 4})  # unreachable, packet too big, time exceeded, parameter
_ICMPV6_NEIGHBOUR_DISCOVERY = frozenset({133, 134, 135, 136, 137})
_ICMP_HEADER_BYTES = 8  # the embedded packet of an ICMP error starts after type, code, checksum, 4

_PROTO_NAMES = {
    (PROTO_TCP,): "tcp",
    (PROTO_UDP,): "udp",
    (PROTO_ICMP, PROTO_ICMPV6): "icmp",
}


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule, in the form the hot path matches with integer operations.

    ``protos``: protocol numbers, or None for any. ``ports``: inclusive (lo, hi) ranges of the
    destination port (the VM's for "in", the remote's for "out"), or None for any. ``network``:
    the remote peer's network as (IP version, network as int, mask as int), or None for any.
    """

    direction: str  # "in" | "out"
    protos: tuple[int, ...] | None
    ports: tuple[tuple[int, int], ...] | None
    network: tuple[int, int, int] | None
    action: str  # ALLOW | DROP | REJECT

    @property
    def description(self) -> str:
        """The rule in one line, e.g. "in tcp 22,8000-8080 10.0.0.0/8 → allow"."""
        proto = "any" if self.protos is None else _PROTO_NAMES.get(
            self.protos, ",".join(str(p) for p in self.protos)
        )
        ports = "any" if self.ports is None else ",".join(
            str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports
        )
        return f"{self.direction} {proto} {ports} {_show_network(self.network)} → {self.action}"


@dataclass(frozen=True, slots=True)
class CompiledProfile:
    """A security profile: rules in order (first match wins) and a default per direction."""

    name: str
    rules: tuple[CompiledRule, ...]
    default_in: str
    default_out: str
    description: str = ""


def _show_network(network: tuple[int, int, int] | None) -> str:
    if network is None:
        return "any"
    version, net, mask = network
    prefix = bin(mask).count("1")
    try:
        if version == 4:
            return str(ipaddress.IPv4Network((net, prefix)))
        if version == 6:
            return str(ipaddress.IPv6Network((net, prefix)))
    except ValueError:
        pass
    return f"v{version}:{net:#x}&{mask:#x}"  # not a network the compiler would have made


class Flow:
    """What the table keeps about one connection. Mutable: a hit refreshes it in place."""

    __slots__ = ("state", "opened_outgoing", "timeout_ns", "last_ns", "used")

    def __init__(self, state: int, opened_outgoing: bool, timeout_ns: int, now_ns: int) -> None:
        self.state = state  # OPENING/ESTABLISHED/CLOSING for TCP; ESTABLISHED otherwise
        self.opened_outgoing = opened_outgoing  # True: the VM opened it
        self.timeout_ns = timeout_ns  # idle time after which the flow is forgotten
        self.last_ns = now_ns  # when a packet of it was last seen
        self.used = False  # seen since it was (re)queued: spared by the next eviction pass

    def __repr__(self) -> str:
        return (
            f"Flow(state={self.state}, opened_outgoing={self.opened_outgoing}, "
            f"timeout_ns={self.timeout_ns}, last_ns={self.last_ns})"
        )


class FlowTable:
    """Known flows by key, bounded to ``max_flows``, forgotten after their idle timeout.

    Keys: ``(proto, vm_addr, vm_port, remote_addr, remote_port)`` for TCP and UDP,
    ``(proto, vm_addr, remote_addr)`` for everything else (the parser gives ICMP's type and
    code, not its echo id). ``entries`` is read directly by the firewall's hot path; all other
    changes go through the methods so that the counters stay right.
    """

    __slots__ = ("max_flows", "entries", "evicted", "expired")

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, got {max_flows}")
        self.max_flows = max_flows
        # Ordered by when each flow was queued (added, or spared by an eviction pass).
        self.entries: OrderedDict[tuple, Flow] = OrderedDict()
        self.evicted = 0  # live flows pushed out because the table was full
        self.expired = 0  # flows forgotten after their idle timeout

    def __len__(self) -> int:
        return len(self.entries)

    def live(self, key: tuple, now_ns: int) -> Flow | None:
        """The flow under ``key`` if it has not timed out; does not refresh it."""
        flow = self.entries.get(key)
        if flow is None:
            return None
        if now_ns - flow.last_ns < flow.timeout_ns:
            return flow
        del self.entries[key]
        self.expired += 1
        return None

    def add(self, key: tuple, flow: Flow, now_ns: int) -> None:
        """Insert (or replace) a flow, making room first if the table is full."""
        entries = self.entries
        if entries.pop(key, None) is not None:
            entries[key] = flow
            return
        for _ in range(_SWEEP_PER_ADD):
            if not entries:
                break
            front_key, front = next(iter(entries.items()))
            if now_ns - front.last_ns < front.timeout_ns:
                break
            del entries[front_key]
            self.expired += 1
        if len(entries) >= self.max_flows:
            self._make_room(now_ns)
        entries[key] = flow

    def _make_room(self, now_ns: int) -> None:
        entries = self.entries
        for _ in range(_SECOND_CHANCES):
            key, flow = entries.popitem(last=False)
            if now_ns - flow.last_ns >= flow.timeout_ns:
                self.expired += 1
                return
            if not flow.used:
                self.evicted += 1
                return
            flow.used = False  # spared once; it must be used again to be spared again
            entries[key] = flow
        entries.popitem(last=False)
        self.evicted += 1

    def expire(self, now_ns: int) -> int:
        """Forget every timed-out flow (a full sweep, for the shell to call now and then)."""
        entries = self.entries
        dead = [k for k, f in entries.items() if now_ns - f.last_ns >= f.timeout_ns]
        for key in dead:
            del entries[key]
        self.expired += len(dead)
        return len(dead)


class Firewall:
    """One VM's firewall: the profile in force (or None), its flow table and counters.

    Assigning ``firewall.profile`` swaps profiles between two packets: flows are kept
    (established connections survive), rule and default hit counters restart, because they
    count the rules of the profile they belong to.

    Counters: ``hits`` (per rule index of the current profile), ``default_hits`` ({"in", "out"}:
    packets decided by a default, malformed ones included), ``established`` (packets of known
    flows), ``related`` (packets allowed by step 4), ``flows`` (current table size),
    ``evicted``.
    """

    __slots__ = (
        "_profile",
        "_rules_in",
        "_rules_out",
        "table",
        "_entries",
        "hits",
        "default_hits",
        "established",
        "related",
    )

    def __init__(self, profile: CompiledProfile | None = None, max_flows: int = MAX_FLOWS) -> None:
        self.table = FlowTable(max_flows)
        self._entries = self.table.entries
        self.established = 0
        self.related = 0
        self.profile = profile

    @property
    def profile(self) -> CompiledProfile | None:
        return self._profile

    @profile.setter
    def profile(self, profile: CompiledProfile | None) -> None:
        rules = () if profile is None else profile.rules
        # Split by direction once per swap; each entry keeps its index for the hit counters.
        self._rules_in = tuple((i, r) for i, r in enumerate(rules) if r.direction == "in")
        self._rules_out = tuple((i, r) for i, r in enumerate(rules) if r.direction == "out")
        self.hits = [0] * len(rules)
        self.default_hits = {"in": 0, "out": 0}
        self._profile = profile

    @property
    def flows(self) -> int:
        return len(self.table.entries)

    @property
    def evicted(self) -> int:
        return self.table.evicted

    def judge(self, header: Header, payload: bytes, outgoing: bool, now_ns: int) -> str:
        """The verdict for one packet: ``ALLOW``, ``DROP`` or ``REJECT`` (see the module doc).

        ``outgoing``: the packet leaves the VM (uplink); False: it is going to the VM.
        ``payload``: the whole IP packet (read only for the packet inside an ICMP error).
        """
        profile = self._profile
        if profile is None:
            return ALLOW
        proto = header.proto
        if proto == MALFORMED:
            return self._default(profile, outgoing)
        if not header.first_fragment:
            self.related += 1
            return ALLOW
        if outgoing:
            vm_addr, remote_addr = header.src, header.dst
        else:
            vm_addr, remote_addr = header.dst, header.src
        if proto == PROTO_TCP or proto == PROTO_UDP:
            if outgoing:
                key: tuple = (proto, vm_addr, header.sport, remote_addr, header.dport)
            else:
                key = (proto, vm_addr, header.dport, remote_addr, header.sport)
        else:
            key = (proto, vm_addr, remote_addr)

        flow = self._entries.get(key)
        if flow is not None:
            if now_ns - flow.last_ns < flow.timeout_ns:
                if (
                    proto != PROTO_TCP
                    or (flow.state == ESTABLISHED and not header.tcp_flags & _FIN_RST)
                    or _tcp_step(flow, header.tcp_flags, outgoing)
                ):
                    flow.last_ns = now_ns
                    flow.used = True
                    self.established += 1
                    return ALLOW
            else:
                del self._entries[key]
                self.table.expired += 1

        opens_flow = True
        picked_up = False
        if proto == PROTO_TCP:
            flags = header.tcp_flags
            if flags & _RST:
                self.related += 1
                return ALLOW
            opens_flow = flags & (_SYN | _ACK) == _SYN
            # Mid-stream pickup, as conntrack does: a VM connection that was up before the
            # profile was applied is adopted by the VM's next segment, so a swap never cuts it.
            picked_up = outgoing and not flags & _SYN
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            icmp_type = header.sport
            if proto == PROTO_ICMPV6 and icmp_type in _ICMPV6_NEIGHBOUR_DISCOVERY:
                self.related += 1
                return ALLOW
            if icmp_type in (_ICMP_ERRORS if proto == PROTO_ICMP else _ICMPV6_ERRORS):
                if self._error_of_known_flow(header, payload, outgoing, now_ns):
                    self.related += 1
                    return ALLOW
                opens_flow = False

        action = self._new(profile, header, proto, remote_addr, outgoing)
        if action == ALLOW and (opens_flow or picked_up):
            if proto == PROTO_TCP:
                flow = (Flow(OPENING, outgoing, TCP_OPENING_TIMEOUT_NS, now_ns) if opens_flow
                        else Flow(ESTABLISHED, outgoing, TCP_ESTABLISHED_TIMEOUT_NS, now_ns))
            elif proto == PROTO_UDP:
                flow = Flow(ESTABLISHED, outgoing, UDP_TIMEOUT_NS, now_ns)
            elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
                flow = Flow(ESTABLISHED, outgoing, ICMP_TIMEOUT_NS, now_ns)
            else:
                flow = Flow(ESTABLISHED, outgoing, OTHER_TIMEOUT_NS, now_ns)
            self.table.add(key, flow, now_ns)
        return action

    def _default(self, profile: CompiledProfile, outgoing: bool) -> str:
        if outgoing:
            self.default_hits["out"] += 1
            return profile.default_out
        self.default_hits["in"] += 1
        return profile.default_in

    def _new(
        self,
        profile: CompiledProfile,
        header: Header,
        proto: int,
        remote_addr: bytes,
        outgoing: bool,
    ) -> str:
        """First matching rule of the direction, else its default (step 5)."""
        # "in": the VM's port is the destination; "out": the remote's port is. Either way dport.
        port = header.dport
        version = header.version
        remote = -1  # the remote address as an int, computed when a rule first needs it
        for index, rule in self._rules_out if outgoing else self._rules_in:
            protos = rule.protos
            if protos is not None and proto not in protos:
                continue
            ports = rule.ports
            if ports is not None:
                for lo, hi in ports:
                    if lo <= port <= hi:
                        break
                else:
                    continue
            network = rule.network
            if network is not None:
                if network[0] != version:
                    continue
                if remote < 0:
                    remote = int.from_bytes(remote_addr, "big")
                if remote & network[2] != network[1]:
                    continue
            self.hits[index] += 1
            return rule.action
        return self._default(profile, outgoing)

    def _error_of_known_flow(
        self, header: Header, payload: bytes, outgoing: bool, now_ns: int
    ) -> bool:
        """Whether the packet embedded in this ICMP error belongs to a known flow.

        The embedded packet travelled the other way: an error coming in to the VM quotes a
        packet the VM sent out, and vice versa.
        """
        inner = parse(payload[header.l4_offset + _ICMP_HEADER_BYTES :])
        proto = inner.proto
        if proto == MALFORMED:
            return False
        if outgoing:  # the quoted packet came in: the VM is its destination
            vm_addr, remote_addr = inner.dst, inner.src
            vm_port, remote_port = inner.dport, inner.sport
        else:
            vm_addr, remote_addr = inner.src, inner.dst
            vm_port, remote_port = inner.sport, inner.dport
        if proto == PROTO_TCP or proto == PROTO_UDP:
            key: tuple = (proto, vm_addr, vm_port, remote_addr, remote_port)
        else:
            key = (proto, vm_addr, remote_addr)
        return self.table.live(key, now_ns) is not None

    def expire(self, now_ns: int) -> int:
        """Forget timed-out flows now (they are otherwise dropped lazily); how many went."""
        return self.table.expire(now_ns)

    def snapshot(self) -> dict[str, object]:
        """The profile and counters as plain data, for status and metrics."""
        profile = self._profile
        rules = () if profile is None else profile.rules
        return {
            "profile": None if profile is None else profile.name,
            "default_in": None if profile is None else profile.default_in,
            "default_out": None if profile is None else profile.default_out,
            "rules": [
                {"rule": rule.description, "hits": hits} for rule, hits in zip(rules, self.hits)
            ],
            "default_hits": dict(self.default_hits),
            "established": self.established,
            "related": self.related,
            "flows": len(self.table.entries),
            "evicted": self.table.evicted,
            "expired": self.table.expired,
        }

    def __repr__(self) -> str:
        name = None if self._profile is None else self._profile.name
        return f"Firewall(profile={name!r}, flows={len(self.table.entries)})"


def _tcp_step(flow: Flow, flags: int, outgoing: bool) -> bool:
    """Advance a live TCP flow on one of its packets; False: a new connection reuses its ports.

    opening → established when the side that did not open answers; any → closing on FIN/RST.
    """
    if flags & _FIN_RST:
        flow.state = CLOSING
    elif flow.state == OPENING:
        if outgoing != flow.opened_outgoing:
            flow.state = ESTABLISHED
    elif flow.state == CLOSING and flags & (_SYN | _ACK) == _SYN:
        return False
    flow.timeout_ns = _TCP_TIMEOUT_NS[flow.state]
    return True
