"""The daemon's NAT rules: a skin's ``ip_address`` (SNAT out, DNAT in) and its DNS redirection.

Owned the way ``rules`` owns the filter chain: three chains in the nat table of iptables and
ip6tables, ``NETSKIN-PRE`` (from PREROUTING), ``NETSKIN-OUT`` (OUTPUT) and ``NETSKIN-POST``
(POSTROUTING), each jumped to by a rule tagged ``netskin``; installing is one
``iptables-restore --noflush`` transaction per family that drops leftover jumps, rebuilds the
chains and inserts fresh jumps. NAT is decided on a connection's first packet, so a changed plan
only reaches existing flows once their conntrack entries go: ``flush_conntrack`` does that.

Matching is by the VM's host-side device with ``-i``/``-o``: routed VMs (the lab's taps). Bridged
VM traffic never passes the host's nat hooks as routed traffic, so a bridged VM gets neither.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from interceptor.rules import TAG, RulesError, _families, _run

CHAINS = {"PREROUTING": "NETSKIN-PRE", "OUTPUT": "NETSKIN-OUT", "POSTROUTING": "NETSKIN-POST"}
DNS_PORT = 53


@dataclass(frozen=True)
class NatPlan:
    """What one VM needs from the nat table; None fields need nothing."""

    vm: str
    interface: str  # host-side device
    address: str  # the VM's own IPv4 address (it keeps it)
    address6: str | None = None
    ip_address: str | None = None  # the skin address peers see
    dns4: str | None = None  # IPv4 server that answers the VM's DNS queries
    dns6: str | None = None  # IPv6 server that answers the VM's DNS queries

    def __post_init__(self) -> None:
        # These end up in iptables-restore input: anything but an address is a bug upstream.
        for name, kind in (("address", IPv4Address), ("ip_address", IPv4Address), ("dns4", IPv4Address),
                           ("address6", IPv6Address), ("dns6", IPv6Address)):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, str(kind(value)))
                except ValueError:
                    raise ValueError(f"NatPlan for VM {self.vm!r}: {name} {value!r} is not an {kind.__name__}") from None
        if not self.interface or any(c.isspace() or c in "\"'/" for c in self.interface):
            raise ValueError(f"NatPlan for VM {self.vm!r}: {self.interface!r} is not an interface name")


def _our_lines(save_output: str) -> tuple[list[str], set[str]]:
    """Leftover jump rules (as saved) in the nat table, and which of our chains exist."""
    jumps, chains, in_nat = [], set(), False
    for line in save_output.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat:
            continue
        elif line.startswith(":") and line[1:].split()[0] in CHAINS.values():
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            hook, target = line.split()[1], line.rstrip().rsplit(" ", 1)[-1]
            if CHAINS.get(hook) == target and line.rstrip().endswith(f"-j {target}"):
                jumps.append(line)
    return jumps, chains


def _rules(plan: NatPlan, family: int) -> list[str]:
    """``-A`` lines for one VM in one family (AF_INET or AF_INET6)."""
    pre, out, post = CHAINS["PREROUTING"], CHAINS["OUTPUT"], CHAINS["POSTROUTING"]
    tag = f'-m comment --comment "{TAG}"'
    lines = []
    dns = plan.dns4 if family == socket.AF_INET else plan.dns6
    if dns is not None:
        to = dns if family == socket.AF_INET else f"[{dns}]"
        for proto in ("udp", "tcp"):
            lines.append(f"-A {pre} -i {plan.interface} -p {proto} -m {proto} --dport {DNS_PORT} {tag} "
                         f"-j DNAT --to-destination {to}:{DNS_PORT}")
    if family == socket.AF_INET and plan.ip_address is not None:
        vm, skin, dev = plan.address, plan.ip_address, plan.interface
        # Peers see the skin address; conntrack turns their replies back to the VM's own.
        lines.append(f"-A {post} -s {vm}/32 ! -o {dev} {tag} -j SNAT --to-source {skin}")
        # Connections opened towards the skin address reach the VM, from peers and from the host.
        lines.append(f"-A {pre} -d {skin}/32 ! -i {dev} {tag} -j DNAT --to-destination {vm}")
        lines.append(f"-A {out} -d {skin}/32 {tag} -j DNAT --to-destination {vm}")
    return lines


def render(plans: list[NatPlan], family: int, leftover_jumps: list[str]) -> str:
    """The iptables-restore input that makes the nat chains ours, whatever was there before."""
    skins = [plan.ip_address for plan in plans if plan.ip_address is not None]
    if len(skins) != len(set(skins)):
        raise ValueError(f"two VMs were given the same skin ip_address: {sorted(skins)}")
    lines = ["*nat"] + [f":{chain} - [0:0]" for chain in CHAINS.values()]  # declaring flushes
    lines += ["-D" + jump[2:] for jump in leftover_jumps]
    for plan in plans:
        lines += _rules(plan, family)
    for hook, chain in CHAINS.items():
        lines.append(f'-I {hook} 1 -m comment --comment "{TAG}" -j {chain}')
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _family_of(save: str) -> int:
    return socket.AF_INET6 if save.startswith("ip6") else socket.AF_INET


def install_nat(plans: list[NatPlan]) -> None:
    """Atomically (per address family) replace whatever netskin NAT rules exist with these."""
    for save, restore in _families():
        jumps, _ = _our_lines(_run([save, "-t", "nat"]))
        _run([restore, "-w", "--noflush"], render(plans, _family_of(save), jumps))


def remove_nat() -> bool:
    """Remove every netskin NAT rule and chain. Returns whether anything was there."""
    found = False
    for save, restore in _families():
        jumps, chains = _our_lines(_run([save, "-t", "nat"]))
        if not jumps and not chains:
            continue
        found = True
        lines = ["*nat"] + ["-D" + jump[2:] for jump in jumps]
        for chain in CHAINS.values():
            if chain in chains:
                lines += [f"-F {chain}", f"-X {chain}"]
        _run([restore, "-w", "--noflush"], "\n".join(lines + ["COMMIT"]) + "\n")
    return found


def flush_conntrack(address: str) -> int:
    """Forget every tracked connection the VM at ``address`` takes part in; returns how many.

    Entries whose original source is the address (flows the VM opened) and whose reply source is
    it (flows opened towards it, possibly through a skin address). Their next packet is tracked
    afresh and meets the current NAT rules, so a changed ``ip_address`` or DNS server applies to
    existing UDP flows at once. Established TCP connections through a changed NAT break: a peer
    cannot follow an address change mid-connection.
    """
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    ip = ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    deleted = 0
    try:
        with Conntrack(nfgen_family=family) as ct:
            if family == socket.AF_INET:
                entries = list(ct.dump_entries(tuple_orig=NFCTAttrTuple(family=family, saddr=str(ip))))
                entries += ct.dump_entries(tuple_reply=NFCTAttrTuple(family=family, saddr=str(ip)))
            else:
                # pyroute2 0.9.7's filtered dump finds no IPv6 entry at all: filter here instead.
                entries = [entry for entry in ct.dump_entries()
                           if ip in (ip_address(entry.tuple_orig.saddr), ip_address(entry.tuple_reply.saddr))]
            seen = set()
            for entry in entries:
                key = repr(entry.tuple_orig)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    ct.delete(entry)
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # gone by itself in between
                        raise
    except NetlinkError as exc:
        raise RulesError(f"flushing conntrack entries of {address} failed: {exc}") from exc
    return deleted
