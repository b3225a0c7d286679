"""A VM's security profile as kernel rules: a chain pair in the filter table, and its counters.

Pure text in, text out: ``chain_rules`` turns a ``CompiledProfile`` into the ``-A`` lines of the
VM's two chains, ``jump_rule`` into a line that sends some of the VM's traffic to one of them, and
``parse_counters`` reads the hits back from ``iptables-save -c``. ``interceptor.rules`` owns the
transactions that install them. Enforcing the profile in the kernel means it holds whatever the
daemon does: a dead daemon, a bypassed or full queue, a daemon that was never started.

Theory of operation
-------------------
Chain ``NSKFW-<hash8>-in`` judges traffic towards the VM (reached by ``-o IF`` and
``--physdev-out IF``), ``NSKFW-<hash8>-out`` traffic leaving it (``-i IF``, ``--physdev-in IF``).
The hash is of the VM's name, so the names are stable across restarts and need no state. Each
chain, first match wins:

1. conntrack ESTABLISHED or RELATED: RETURN. Replies to connections the VM opened pass under
   every profile, and so do ICMP errors about them. nf_conntrack picks up TCP mid-stream, so a
   connection that was up before the profile was applied is adopted by its next segment.
2. (ip6tables only) ICMPv6 router and neighbour discovery, types 133-137: RETURN. IPv6's ARP.
3. The profile's rules of that direction, in order. A rule becomes one iptables rule per
   protocol, per block of at most 15 multiport slots and, for ``reject`` with proto ``any``, one
   TCP rule (answered with a reset) before the catch-all (answered with port unreachable). A rule
   with an IPv4 cidr exists only in iptables, one with an IPv6 cidr only in ip6tables.
4. The profile's default for that direction.

``allow`` is RETURN, never ACCEPT: the packet goes on to the host's own rules, so netskin never
lets through what the host's firewall would stop. Every rule carries a comment naming what it
is (``netskin rule 3: ...``), which is how ``parse_counters`` attributes kernel hit counters;
the jump to each chain names the VM and the profile (``netskin vm=web1 profile=standard``), so
counters are read back without any daemon state.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shlex

from interceptor.profiles import ALLOW, DROP, REJECT, CompiledProfile, CompiledRule
from interceptor.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

CHAIN_PREFIX = "NSKFW-"
MULTIPORT_SLOTS = 15  # xt_multiport's limit; a range takes two slots
ICMPV6_NEIGHBOUR_DISCOVERY = (133, 134, 135, 136, 137)
COMMENT_BYTES = 255  # xt_comment keeps 256 bytes including the terminating NUL

_JUMP_COMMENT_RE = re.compile(r"netskin vm=(?P<vm>\S+) profile=(?P<profile>\S+)")
_RULE_COMMENT_RE = re.compile(r"netskin rule (?P<index>[0-9]+): (?P<description>.*)", re.DOTALL)
_DEFAULT_COMMENT_RE = re.compile(r"netskin default (?P<direction>in|out): .*")
_PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "ipv6-icmp"}


def chain_names(vm_name: str) -> tuple[str, str]:
    """The VM's (in, out) chain names: stable, 18 characters, from its name alone."""
    digest = hashlib.sha256(vm_name.encode()).hexdigest()[:8]
    return f"{CHAIN_PREFIX}{digest}-in", f"{CHAIN_PREFIX}{digest}-out"


def jump_comment(vm_name: str, profile_name: str) -> str:
    return f"netskin vm={vm_name} profile={profile_name}"


def parse_jump_comment(comment: str | None) -> tuple[str, str] | None:
    """(VM name, profile name) from a jump's comment, or None for any other comment."""
    match = _JUMP_COMMENT_RE.fullmatch(comment or "")
    return None if match is None else (match["vm"], match["profile"])


def jump_rule(chain: str, match: str, vm_name: str, profile_name: str, direction: int) -> str:
    """The line of ``chain`` that sends what ``match``es to the VM's chain ``direction`` (0 in,
    1 out); its comment names the VM and profile (``interceptor.rules`` lays these out)."""
    target = chain_names(vm_name)[direction]
    return f"-A {chain} {match} -m comment --comment {_quote(jump_comment(vm_name, profile_name))} -j {target}"


def chain_rules(profile: CompiledProfile, vm_name: str, version: int) -> list[str]:
    """Every ``-A`` line of the VM's two chains for one address family (4 or 6)."""
    lines: list[str] = []
    for direction, chain in zip(("in", "out"), chain_names(vm_name)):
        lines.append(
            f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED "
            f"-m comment --comment {_quote('netskin established')} -j RETURN"
        )
        if version == 6:
            for icmp_type in ICMPV6_NEIGHBOUR_DISCOVERY:
                lines.append(
                    f"-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} "
                    f"-m comment --comment {_quote('netskin neighbour discovery')} -j RETURN"
                )
        for index, rule in enumerate(profile.rules, start=1):
            if rule.direction == direction:
                comment = _fit(f"netskin rule {index}: {rule.description}")
                lines += [f"-A {chain} {spec}" for spec in _rule_specs(rule, direction, version, comment)]
        default = profile.default_in if direction == "in" else profile.default_out
        comment = f"netskin default {direction}: {default}"
        lines += [f"-A {chain} {spec}" for spec in _action_specs([""], default, None, version, comment)]
    return lines


def _rule_specs(rule: CompiledRule, direction: str, version: int, comment: str) -> list[str]:
    """One profile rule as rule specs (matches and target, without ``-A CHAIN``)."""
    address = ""
    if rule.network is not None:
        net_version, net, mask = rule.network
        if net_version != version:
            return []  # an IPv4 cidr never matches an IPv6 packet, and the other way round
        kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        network = kind((net, bin(mask).count("1")))
        address = f"{'-s' if direction == 'in' else '-d'} {network} "
    if rule.protos is None:
        protos: list[int | None] = [None]
    else:
        protos = [p for p in rule.protos if p != (PROTO_ICMPV6 if version == 4 else PROTO_ICMP)]
        if not protos:
            return []
    specs: list[str] = []
    for proto in protos:
        proto_match = "" if proto is None else f"-p {_PROTO_NAMES.get(proto, proto)} "
        if rule.ports is None:
            matches = [f"{address}{proto_match}"]
        else:
            matches = [f"{address}{proto_match}{ports}" for ports in _port_matches(rule.ports)]
        specs += _action_specs(matches, rule.action, proto, version, comment)
    return specs


def _port_matches(ports: tuple[tuple[int, int], ...]) -> list[str]:
    """Destination-port matches covering ``ports``, each within multiport's 15 slots."""
    if len(ports) == 1:
        lo, hi = ports[0]
        return [f"--dport {_port_range(lo, hi)} "]
    blocks: list[list[str]] = [[]]
    used = 0
    for lo, hi in ports:
        slots = 1 if lo == hi else 2
        if used + slots > MULTIPORT_SLOTS:
            blocks.append([])
            used = 0
        blocks[-1].append(_port_range(lo, hi))
        used += slots
    return [f"-m multiport --dports {','.join(block)} " for block in blocks]


def _port_range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _action_specs(matches: list[str], action: str, proto: int | None, version: int, comment: str) -> list[str]:
    tag = f"-m comment --comment {_quote(comment)}"
    if action == ALLOW:
        # RETURN, not ACCEPT: the host's own rules still judge the packet.
        return [f"{match}{tag} -j RETURN" for match in matches]
    if action == DROP:
        return [f"{match}{tag} -j DROP" for match in matches]
    if action != REJECT:
        raise ValueError(f"unknown firewall action {action!r}")
    unreachable = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"
    specs = []
    for match in matches:
        if proto == PROTO_TCP:
            specs.append(f"{match}{tag} -j REJECT --reject-with tcp-reset")
        elif proto is None:
            # proto any: TCP gets a reset like a closed port, everything else port unreachable.
            specs.append(f"{match}-p tcp {tag} -j REJECT --reject-with tcp-reset")
            specs.append(f"{match}{tag} -j REJECT --reject-with {unreachable}")
        else:
            specs.append(f"{match}{tag} -j REJECT --reject-with {unreachable}")
    return specs


def _fit(comment: str) -> str:
    """A comment cut to what xt_comment keeps, on a character boundary."""
    data = comment.encode()
    if len(data) <= COMMENT_BYTES:
        return comment
    return data[: COMMENT_BYTES - 3].decode(errors="ignore") + "…"


def _quote(text: str) -> str:
    # Comments hold only names (letters, digits, . _ -), numbers, cidrs and words: no quotes.
    return f'"{text}"'


def is_firewall_chain(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


def comment_of(tokens: list[str]) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == "--comment":
            return tokens[i + 1]
    return None


def target_of(tokens: list[str]) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


def parse_counters(saved_with_counters: list[str]) -> dict[str, dict]:
    """Per VM: its profile, each rule's hits and the defaults' hits, summed over the saves given.

    ``saved_with_counters`` are ``iptables-save -c`` outputs (one per address family). A rule
    that exists in only one family (a cidr of that family) counts there alone.
    """
    chain_vm: dict[str, tuple[str, str]] = {}  # firewall chain -> (vm, profile)
    counted: list[tuple[str, int, str]] = []  # (chain, packets, comment)
    for saved in saved_with_counters:
        table = None
        for line in saved.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
                continue
            if table != "filter":
                continue
            packets, spec = _split_counters(line)
            if spec is None or not spec.startswith("-A "):
                continue
            tokens = shlex.split(spec)
            chain, comment, target = tokens[1], comment_of(tokens), target_of(tokens)
            if comment is None:
                continue
            jump = parse_jump_comment(comment)
            if jump and target and is_firewall_chain(target):
                chain_vm[target] = jump
            elif is_firewall_chain(chain):
                counted.append((chain, packets, comment))

    result: dict[str, dict] = {}
    rules: dict[str, dict[int, dict]] = {}
    for chain, (vm, profile) in chain_vm.items():
        result.setdefault(vm, {"profile": profile, "rules": [], "default_hits": {"in": 0, "out": 0}})
        rules.setdefault(vm, {})
    for chain, packets, comment in counted:
        if chain not in chain_vm:
            continue  # a chain no jump leads to: not in force
        vm = chain_vm[chain][0]
        if match := _RULE_COMMENT_RE.fullmatch(comment):
            entry = rules[vm].setdefault(int(match["index"]), {"rule": match["description"], "hits": 0})
            entry["hits"] += packets
        elif match := _DEFAULT_COMMENT_RE.fullmatch(comment):
            result[vm]["default_hits"][match["direction"]] += packets
    for vm, by_index in rules.items():
        result[vm]["rules"] = [by_index[index] for index in sorted(by_index)]
    return result


def _split_counters(line: str) -> tuple[int, str | None]:
    """(packets, the rest) of an ``iptables-save -c`` line; (0, line) without counters."""
    if line.startswith("["):
        end = line.find("]")
        if end < 0:
            return 0, None
        packets = line[1:end].split(":", 1)[0]
        return (int(packets) if packets.isdigit() else 0), line[end + 1 :].strip()
    return 0, line
