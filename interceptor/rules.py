"""Netfilter rules netskin owns: steering into NFQUEUE (mangle) and the VMs' firewalls (filter).

Steering, in the mangle table, costs a packet the same whatever the number of VMs. Chain
``NETSKIN-UP``, appended to PREROUTING, sends what enters from a VM to its group's uplink queue;
chain ``NETSKIN-DOWN``, appended to POSTROUTING, sends what leaves towards a VM to its group's
downlink queue. A group of VMs (today: all of them) shares its queues, and the daemon tells the
VMs apart by the packet's devices (``interceptor.engine.classify``); each VM's leaf rules name the
queue of each of its directions (the daemon's per-segment or GSO pair), so moving a direction is
rewriting its leaves.

A device match takes an exact name or a prefix (``tap+``), so the VMs' interface names are laid
out as a radix tree of chains (``NETSKIN-TI-<hash>`` and its kin): each chain covers one common
prefix and holds a rule per next character, so a packet walks a few rules per level of the name,
however many VMs there are. There are four trees: the incoming device (a routed tap or veth) in
``NETSKIN-UP``; the outgoing device in ``NETSKIN-DOWN``; and, entered only by packets that
crossed a bridge (``--physdev-is-in``, ``--physdev-is-bridged``), the bridge port in
``NETSKIN-UP-PORTS`` and ``NETSKIN-DOWN-PORTS``. A packet the host routes onto a VM's bridge has
no port yet in POSTROUTING; it is matched by its destination in an ipset of type
``hash:net,iface`` per downlink queue (``netskin-<queue>-v4`` / ``-v6``: each bridge port's
address with its bridge), one hash lookup. (An ipset keyed by the interface alone does not scale:
``hash:net,iface`` hashes only the net, so every VM's "any address" entry lands in one bucket of
at most 64, and its ``physdev:`` entries are never matched from iptables.)

So every layout is seen, in both directions, and a packet between two VMs meets the sender's
uplink and then the receiver's downlink. Uplink steering runs before the filter table and
downlink steering after it; either way a packet the daemon accepts goes on through the rest of
the host's rules (libvirt's, Docker's, the admin's) as if netskin were not there.

One packet-mark bit (the host config's ``steering_mark``) lives only between mangle PREROUTING
and the routing decision, and only on packets from a VM's bridge port: the kernel runs IPv4/IPv6
PREROUTING once at the bridge (where netskin queues) and, for the segments the queue cut out of
a GSO packet bound for the host or routed by it, once more on the way up the IP stack. The bit,
set as the packet is queued, makes ``NETSKIN-UP`` let that second pass by (queued twice, a
segment took the rate twice and arrived after its successors: TCP from a guest through a
bridge the host routes got a third less than asked). Chain ``NETSKIN-SEEN``, first in mangle
FORWARD and INPUT, clears it again.

Firewall: chain ``NETSKIN`` in the filter table, inserted at position 1 of FORWARD, INPUT and
OUTPUT, sends a packet to the per-VM chains of the VMs that wear a profile (``interceptor.firewall``
renders them). It is laid out like the steering, at the same cost whatever the number of VMs: a
tree of the incoming device and one of the outgoing device (``NETSKIN-TFI-<hash>``,
``NETSKIN-TFO-<hash>``) whose leaves jump to the VM's ``-out`` and ``-in`` chain, and, entered only
by bridged packets, trees of the bridge port in ``NETSKIN-FROM-PORTS`` and ``NETSKIN-TO-PORTS``.
A packet the host routes onto a bridge port's bridge is matched by the bridge and the VM's
address, one rule per such VM (only bridge ports with a configured address have one). Every
leaf names the VM and its profile in its comment. The VM chains RETURN what the profile allows
and the tree chains end without a verdict, so the host's rules still apply after them. Changing
one VM's profile rebuilds the trees in the same transaction from the other VMs' saved leaves
(their device and profile) and keeps their chains as they are.

Every rule change is one ``iptables-restore --noflush`` transaction per address family, computed
from the current ``iptables-save`` output: it removes whatever netskin had there (a killed run's
leftovers, older layouts) and writes the new state, so there is never a moment with two copies
or with none. The sets are filled before the rules that use them: each is built under a
temporary name and swapped in (``ipset swap`` is atomic), so a set left by a crashed run is
replaced without a moment of being empty; they are destroyed after the rules are removed. Every
call is bounded by a timeout. Rules go through the iptables CLI because this kernel's nftables
has no native ``queue`` statement (iptables-nft reaches NFQUEUE through nft_compat).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from interceptor import firewall
from interceptor.profiles import CompiledProfile

CHAIN = "NETSKIN"  # filter: the jumps to the VMs' firewalls (and, in mangle, an earlier layout)
UP_CHAIN = "NETSKIN-UP"  # mangle PREROUTING: what enters from a VM → its uplink queue
DOWN_CHAIN = "NETSKIN-DOWN"  # mangle POSTROUTING: what leaves towards a VM → its downlink queue
SEEN_CHAIN = "NETSKIN-SEEN"  # mangle FORWARD and INPUT: clear the steering mark bit
SEEN_HOOKS = ("FORWARD", "INPUT")
DEFAULT_MARK = 0x0010_0000
UP_PORTS_CHAIN = "NETSKIN-UP-PORTS"  # mangle: bridged packets, by the bridge port they came in on
DOWN_PORTS_CHAIN = "NETSKIN-DOWN-PORTS"  # mangle: bridged packets, by the bridge port they go out of
TREE_PREFIX = "NETSKIN-T"  # mangle: the chains of the interface-name trees (NETSKIN-TI-<hash>, ...)
SET_PREFIX = "netskin-"  # ipsets: netskin-<downlink queue>-v4 / -v6
TAG = "netskin"
HOOKS = ("FORWARD", "INPUT", "OUTPUT")  # filter hooks jumping to CHAIN
DEFAULT_TIMEOUT_S = 10.0

# A [vms] name, or a libvirt VM's DOMAIN/IFACE (interceptor.vmset): it only shows in comments.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?")
_INTERFACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,14}")


class RulesError(RuntimeError):
    pass


@dataclass(frozen=True)
class VmRules:
    """One VM as the rules see it: its name, host-side device, queues and firewall profile."""

    name: str
    interface: str
    uplink_queue: int
    downlink_queue: int
    profile: CompiledProfile | None = None
    # When the interface is a port of a Linux bridge: the bridge, and the VM's addresses, so that
    # traffic the host routes onto the bridge for the VM is seen too.
    bridge: str | None = None
    address: str | None = None
    address6: str | None = None

    def address_for(self, version: int) -> str | None:
        return self.address if version == 4 else self.address6


# --- the module API ---------------------------------------------------------------------------


def install(vms: list[VmRules], fail_open: bool, mark: int = DEFAULT_MARK, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Steering and every VM's firewall chains, replacing whatever netskin had installed."""
    _check(vms)
    deadline = _Deadline(timeout_s)
    families = _family_tools()
    if vms:
        _ipset_restore(render_sets(vms, [version for _, _, version in families]), deadline)
    for save, restore, version in families:
        saved = _run([save], timeout_s=deadline.left())
        _restore(restore, render_install(saved, vms, fail_open, version, mark), deadline)
    # Sets of an earlier configuration (another queue_base) are no longer referenced: drop them.
    wanted = set(set_names(vms, [version for _, _, version in families]))
    _destroy_sets([name for name in _our_sets(deadline) if name not in wanted], deadline)


def set_profile(vm: VmRules, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Give one VM this firewall (``vm.profile``; None removes it); other VMs are untouched."""
    _check([vm])
    deadline = _Deadline(timeout_s)
    for save, restore, version in _family_tools():
        saved = _run([save], timeout_s=deadline.left())
        _restore(restore, render_set_profile(saved, vm, version), deadline)


def remove_steering(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Remove the mangle steering only; the firewalls stay. Whether there was any."""
    deadline = _Deadline(timeout_s)
    found = False
    for save, restore, _ in _family_tools():
        text = render_remove_steering(_run([save], timeout_s=deadline.left()))
        found |= bool(text)
        _restore(restore, text, deadline)
    sets = _our_sets(deadline)  # after the rules: a set in use cannot be destroyed
    _destroy_sets(sets, deadline)
    return found or bool(sets)


def remove(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Remove everything netskin owns in mangle and filter. Whether there was anything."""
    deadline = _Deadline(timeout_s)
    found = False
    for save, restore, _ in _family_tools():
        text = render_remove(_run([save], timeout_s=deadline.left()))
        found |= bool(text)
        _restore(restore, text, deadline)
    sets = _our_sets(deadline)
    _destroy_sets(sets, deadline)
    return found or bool(sets)


def firewall_counters(timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, dict]:
    """Per VM with a profile in force: {"profile", "rules": [{"rule", "hits"}], "default_hits"}."""
    deadline = _Deadline(timeout_s)
    saves = [_run([save, "-c"], timeout_s=deadline.left()) for save, _, _ in _family_tools()]
    return firewall.parse_counters(saves)


# --- the sets: ipset restore text ------------------------------------------------------------

def set_name(queue: int, version: int) -> str:
    return f"{SET_PREFIX}{queue}-v{version}"


def _downlink_queues(vms: list[VmRules]) -> list[int]:
    """The distinct downlink queues, in the order of their first VM."""
    return list(dict.fromkeys(vm.downlink_queue for vm in vms))


def set_names(vms: list[VmRules], versions: list[int]) -> list[str]:
    """One set per downlink queue and address family."""
    return [set_name(down, version) for down in _downlink_queues(vms) for version in versions]


def set_entries(vms: list[VmRules], queue: int, version: int) -> list[str]:
    """The members of downlink ``queue``'s set: each bridge port's address, with its bridge as the
    outgoing device (what the host routes onto the bridge for the VM)."""
    entries: list[str] = []
    for vm in vms:
        address = vm.address_for(version)
        if queue == vm.downlink_queue and vm.bridge and address:
            entries.append(f"{address}/{32 if version == 4 else 128},{vm.bridge}")
    return list(dict.fromkeys(entries))


def render_sets(vms: list[VmRules], versions: list[int]) -> str:
    """``ipset restore`` input that makes each downlink queue's sets hold exactly ``vms``' entries:
    each is filled under a temporary name and swapped in, so a set in use is never empty."""
    lines = []
    for queue in _downlink_queues(vms):
        for version in versions:
            name, temporary = set_name(queue, version), f"{set_name(queue, version)}-new"
            entries = set_entries(vms, queue, version)
            family = "inet" if version == 4 else "inet6"
            create = f"hash:net,iface family {family} hashsize 1024 maxelem {max(65536, 2 * len(entries))}"
            lines.append(f"create {temporary} {create} -exist")
            lines.append(f"flush {temporary}")
            lines += [f"add {temporary} {entry}" for entry in entries]
            lines.append(f"create {name} {create} -exist")
            lines.append(f"swap {temporary} {name}")
            lines.append(f"destroy {temporary}")
    return "\n".join(lines) + "\n" if lines else ""


# --- the interface-name trees ----------------------------------------------------------------

# Device matches take a name or a prefix ("tap+"). So the VMs' names become a radix tree of
# chains: a chain holds, for one common prefix, the exact names that end there and one rule per
# next character, either a VM's exact name or a jump to the chain of the longer common prefix.
# A packet walks at most one rule per distinct next character at each level, and at most
# IFNAMSIZ levels: a bound set by the names' alphabet and length, not by the number of VMs.
_MATCHES = {  # kind → (rule text for a name or prefix, uplink?)
    "i": ("-i {}", True),
    "pi": ("-m physdev --physdev-in {}", True),
    "o": ("-o {}", False),
    "po": ("-m physdev --physdev-out {} --physdev-is-bridged", False),
}
# The filter's trees: their leaves jump to a VM's firewall chain (out for what the VM sends).
_FILTER_TREES = (  # (kind, root, gate into the root from NETSKIN or None, template, VM's chain: 0 in, 1 out)
    ("fi", CHAIN, None, "-i {}", 1),
    ("fo", CHAIN, None, "-o {}", 0),
    ("fpi", "NETSKIN-FROM-PORTS", "-m physdev --physdev-is-in", "-m physdev --physdev-in {}", 1),
    ("fpo", "NETSKIN-TO-PORTS", "-m physdev --physdev-is-bridged", "-m physdev --physdev-out {} --physdev-is-bridged", 0),
)


def tree_chain(kind: str, prefix: str) -> str:
    """The chain of ``kind``'s tree for names starting with ``prefix`` (27 characters at most)."""
    return f"{TREE_PREFIX}{kind.upper()}-{hashlib.sha256(prefix.encode()).hexdigest()[:10]}"


def _tree(kind: str, root: str, vms: list[VmRules], bypass: str,
          mark_with: str | None = None) -> tuple[list[str], list[str]]:
    """(chains below ``root``, rules) of the tree that sends each VM's packets to its queue;
    ``mark_with`` ("bit/bit") sets that mark on a VM's packet just before it is queued."""
    template, uplink = _MATCHES[kind]
    by_name = {vm.interface: vm for vm in vms}

    def leaf(chain: str, name: str) -> list[str]:
        vm = by_name[name]
        queue, direction = (vm.uplink_queue, "uplink") if uplink else (vm.downlink_queue, "downlink")
        marking = [f"-A {chain} {template.format(name)} -j MARK --set-xmark {mark_with}"] if mark_with else []
        return marking + [f"-A {chain} {template.format(name)} -m comment --comment \"{TAG} vm={vm.name} {direction}\" "
                          f"-j NFQUEUE --queue-num {queue}{bypass}"]

    return _name_tree(kind, template, root, list(by_name), leaf)


def _name_tree(kind: str, template: str, root: str, names: list[str],
               leaf: Callable[[str, str], list[str]]) -> tuple[list[str], list[str]]:
    """(chains below ``root``, rules) of the radix tree of device ``names`` (matched by
    ``template``); ``leaf(chain, name)`` gives the rules in ``chain`` for the device ``name``."""
    chains: list[str] = []
    lines: list[str] = []

    def build(chain: str, names: list[str], depth: int) -> None:
        for name in names:
            if len(name) == depth:  # before longer ones
                lines.extend(leaf(chain, name))
        groups: dict[str, list[str]] = {}
        for name in names:
            if len(name) > depth:
                groups.setdefault(name[depth], []).append(name)
        for group in groups.values():
            if len(group) == 1:
                lines.extend(leaf(chain, group[0]))
                continue
            prefix = os.path.commonprefix(group)
            child = tree_chain(kind, prefix)
            chains.append(child)
            lines.append(f"-A {chain} {template.format(prefix + '+')} -j {child}")
            build(child, group, len(prefix))

    build(root, sorted(set(names)), 0)
    return chains, lines


# --- rendering: iptables-save text in, iptables-restore text out --------------------------------


@dataclass
class SavedTable:
    """One table of an ``iptables-save`` output: its chains and rules (without counters)."""

    chains: list[str] = field(default_factory=list)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, spec after "-A CHAIN ")


def parse_save(saved: str) -> dict[str, SavedTable]:
    tables: dict[str, SavedTable] = {}
    table: SavedTable | None = None
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("["):  # -c counters
            line = line[line.find("]") + 1 :].strip()
        if line.startswith("*"):
            table = tables.setdefault(line[1:], SavedTable())
        elif table is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            table.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split(None, 2)
            table.rules.append((parts[1], parts[2] if len(parts) > 2 else ""))
    return tables


def render_install(saved: str, vms: list[VmRules], fail_open: bool, version: int, mark: int = DEFAULT_MARK) -> str:
    """Restore input that replaces netskin's rules with steering and firewalls for ``vms``."""
    tables = parse_save(saved)
    return _transaction(
        _mangle_lines(tables.get("mangle"), vms, fail_open, version, mark),
        _filter_lines(tables.get("filter"), {vm.name: vm for vm in vms}, False, version),
    )


def render_set_profile(saved: str, vm: VmRules, version: int) -> str:
    """Restore input that swaps one VM's firewall chains and keeps everything else."""
    tables = parse_save(saved)
    return _transaction([], _filter_lines(tables.get("filter"), {vm.name: vm}, True, version))


def render_remove_steering(saved: str) -> str:
    """Restore input that removes the mangle steering; "" if there is none."""
    return _transaction(_mangle_lines(parse_save(saved).get("mangle"), None, False, 4), [])


def render_remove(saved: str) -> str:
    """Restore input that removes everything netskin owns; "" if there is nothing."""
    tables = parse_save(saved)
    return _transaction(
        _mangle_lines(tables.get("mangle"), None, False, 4),
        _filter_lines(tables.get("filter"), {}, False, 4),
    )


def _transaction(mangle: list[str], filter_: list[str]) -> str:
    text = ""
    for name, lines in (("mangle", mangle), ("filter", filter_)):
        if lines:
            text += "\n".join([f"*{name}", *lines, "COMMIT"]) + "\n"
    return text


def _is_ours(table: str, chain: str) -> bool:
    if table in ("mangle", "filter"):
        return chain == CHAIN or chain.startswith(f"{CHAIN}-") or (table == "filter" and firewall.is_firewall_chain(chain))
    return chain == CHAIN


def _jumps_into_ours(table_name: str, table: SavedTable) -> list[str]:
    """Delete lines for every rule of a chain not ours that jumps into one of ours."""
    lines = []
    for chain, spec in table.rules:
        target = firewall.target_of(shlex.split(spec))
        if not _is_ours(table_name, chain) and target is not None and _is_ours(table_name, target):
            lines.append(f"-D {chain} {spec}")
    return lines


def _mangle_lines(table: SavedTable | None, vms: list[VmRules] | None, fail_open: bool, version: int,
                  mark: int = DEFAULT_MARK) -> list[str]:
    """Steering for ``vms``, or none (``None`` or no VMs), in place of what is there."""
    table = table or SavedTable()
    lines = _jumps_into_ours("mangle", table)
    existing = [chain for chain in table.chains if _is_ours("mangle", chain)]
    if not vms:
        # Every one flushed (declaring a chain flushes it) before any is deleted: they jump to each other.
        return lines + [f":{chain} - [0:0]" for chain in existing] + [f"-X {chain}" for chain in existing]
    bypass = " --queue-bypass" if fail_open else ""
    up_chains, up_lines = _tree("i", UP_CHAIN, vms, bypass)
    bit = f"{mark:#x}/{mark:#x}"
    up_port_chains, up_port_lines = _tree("pi", UP_PORTS_CHAIN, vms, bypass, mark_with=bit)
    down_chains, down_lines = _tree("o", DOWN_CHAIN, vms, bypass)
    down_port_chains, down_port_lines = _tree("po", DOWN_PORTS_CHAIN, vms, bypass)
    wanted = [UP_CHAIN, DOWN_CHAIN, UP_PORTS_CHAIN, DOWN_PORTS_CHAIN, SEEN_CHAIN,
              *up_chains, *up_port_chains, *down_chains, *down_port_chains]
    stale = [chain for chain in existing if chain not in wanted]
    lines += [f":{chain} - [0:0]" for chain in wanted] + [f":{chain} - [0:0]" for chain in stale]
    lines += [f"-X {chain}" for chain in stale]
    # A bridge port's packet seen here a second time (see the module's docstring) is queued already.
    lines.append(f'-A {UP_CHAIN} -m mark --mark {bit} -m comment --comment "{TAG} queued already" -j RETURN')
    lines.append(f"-A {SEEN_CHAIN} -m mark --mark {bit} -j MARK --set-xmark 0x0/{mark:#x}")
    # Routed taps and veths by their device; packets that crossed a bridge port by the port.
    lines += up_lines
    lines.append(f'-A {UP_CHAIN} -m physdev --physdev-is-in -m comment --comment "{TAG}" -j {UP_PORTS_CHAIN}')
    lines += up_port_lines
    lines += down_lines
    # Routed by the host onto a VM's bridge: the port is chosen after POSTROUTING, so the VM is
    # told by its address on that bridge, looked up in the queue's set.
    for down in _downlink_queues(vms):
        lines.append(f'-A {DOWN_CHAIN} -m set --match-set {set_name(down, version)} dst,dst '
                     f'-m comment --comment "{TAG} downlink routed onto a bridge" -j NFQUEUE --queue-num {down}{bypass}')
    lines.append(f'-A {DOWN_CHAIN} -m physdev --physdev-is-bridged -m comment --comment "{TAG}" -j {DOWN_PORTS_CHAIN}')
    lines += down_port_lines
    # Appended: the host's mangle rules in these chains (TCPMSS clamping, marks) run first, since
    # a packet the daemon accepts leaves mangle's chain at the queue.
    lines.append(f'-A PREROUTING -m comment --comment "{TAG}" -j {UP_CHAIN}')
    lines.append(f'-A POSTROUTING -m comment --comment "{TAG}" -j {DOWN_CHAIN}')
    lines += [f'-I {hook} 1 -m comment --comment "{TAG}" -j {SEEN_CHAIN}' for hook in SEEN_HOOKS]
    return lines


def _filter_lines(table: SavedTable | None, wanted: dict[str, VmRules], keep_others: bool, version: int) -> list[str]:
    """Firewalls for the VMs in ``wanted`` (those with a profile), replacing theirs.

    ``keep_others``: the chains of VMs not in ``wanted`` stay, and so do their jumps (set_profile):
    each such VM's device and profile are read back from its saved jumps, and the trees of
    ``NETSKIN`` are rebuilt for all the profiled VMs. Otherwise they go (install, remove).
    Old-layout rules in ``NETSKIN`` (NFQUEUE, mark/REJECT, one line of jumps per VM) always go.
    """
    table = table or SavedTable()
    lines = _jumps_into_ours("filter", table)
    existing = [chain for chain in table.chains if _is_ours("filter", chain)]

    devices: dict[str, tuple[str, str]] = {}  # interface -> (VM, profile): the trees' leaves
    kept: list[str] = []  # other VMs' routed-onto-a-bridge jumps, replayed as saved
    kept_chains: set[str] = set()
    if keep_others:
        for chain, spec in table.rules:
            tokens = shlex.split(spec)
            comment, target = firewall.comment_of(tokens), firewall.target_of(tokens)
            jump = firewall.parse_jump_comment(comment)
            if (not _is_ours("filter", chain) or firewall.is_firewall_chain(chain) or not jump
                    or jump[0] in wanted or target not in existing):
                continue
            kept_chains.add(target)
            if "-d" in tokens:
                kept.append(spec)
                continue
            for flag in ("-i", "-o"):
                if flag in tokens[:-1]:
                    devices[tokens[tokens.index(flag) + 1]] = jump

    profiled = [vm for vm in wanted.values() if vm.profile is not None]
    for vm in profiled:
        devices[vm.interface] = (vm.name, vm.profile.name)
    live: set[str] = set()
    rules: list[str] = []
    if devices:
        live = {CHAIN} | kept_chains | {c for vm in profiled for c in firewall.chain_names(vm.name)}
        for vm in profiled:
            rules += firewall.chain_rules(vm.profile, vm.name, version)
        for kind, root, gate, template, direction in _FILTER_TREES:
            def leaf(chain: str, name: str, template: str = template, direction: int = direction) -> list[str]:
                vm_name, profile_name = devices[name]
                return [firewall.jump_rule(chain, template.format(name), vm_name, profile_name, direction)]
            chains, tree = _name_tree(kind, template, root, list(devices), leaf)
            if gate:
                live |= {root}
                rules.append(f'-A {CHAIN} {gate} -m comment --comment "{TAG}" -j {root}')
            live |= set(chains)
            rules += tree
            if kind == "fo":  # routed by the host onto a VM's bridge: by the bridge and the VM's address
                rules += [f"-A {CHAIN} {spec}" for spec in kept]
                for vm in profiled:
                    address = vm.address_for(version)
                    if vm.bridge and address:
                        rules.append(firewall.jump_rule(CHAIN, f"-o {vm.bridge} -d {address}/{32 if version == 4 else 128}",
                                                        vm.name, vm.profile.name, 0))
        # Position 1: the VM's profile judges first; allowed packets RETURN to the host's rules.
        rules += [f'-I {hook} 1 -m comment --comment "{TAG}" -j {CHAIN}' for hook in HOOKS]
    # Every chain of ours flushed (declaring a chain flushes it) before any is deleted: they jump
    # to each other. The other VMs' firewall chains are kept as they are.
    declared = [CHAIN] * bool(devices) + sorted(live - {CHAIN} - kept_chains)
    stale = sorted((chain for chain in existing if chain not in live), key=lambda c: c != CHAIN)
    lines += [f":{chain} - [0:0]" for chain in declared + stale]
    lines += [f"-X {chain}" for chain in stale]
    return lines + rules


# --- running the tools ----------------------------------------------------------------------


def _check(vms: list[VmRules]) -> None:
    chains: dict[str, str] = {}
    for vm in vms:
        if not _NAME_RE.fullmatch(vm.name):
            raise RulesError(f"VM name {vm.name!r} cannot name netfilter rules (use letters, digits, '.', '_', '-'; one '/' for DOMAIN/IFACE)")
        if not _INTERFACE_RE.fullmatch(vm.interface):
            raise RulesError(f"VM {vm.name}: {vm.interface!r} is not an interface name")
        for queue in (vm.uplink_queue, vm.downlink_queue):
            if not 0 <= queue <= 65_535:
                raise RulesError(f"VM {vm.name}: queue {queue} is out of range (0–65535)")
        chain = firewall.chain_names(vm.name)[0]
        if chains.setdefault(chain, vm.name) != vm.name:
            raise RulesError(f"VMs {chains[chain]} and {vm.name} hash to the same firewall chain {chain}; rename one")


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise RulesError(f"netfilter rules not changed within {self.timeout_s:g} s")
        return left


def _families() -> list[tuple[str, str]]:
    """(save, restore) command pairs for the address families this host has tools for."""
    pairs = []
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        if shutil.which(save) and shutil.which(restore):
            pairs.append((save, restore))
    if not pairs:
        raise RulesError("iptables-restore not found: install the iptables package")
    return pairs


def _family_tools() -> list[tuple[str, str, int]]:
    return [(save, restore, 6 if save.startswith("ip6") else 4) for save, restore in _families()]


def _restore(restore: str, text: str, deadline: _Deadline) -> None:
    if not text:
        return
    left = deadline.left()
    # -w: wait for the xtables lock (legacy backend) at most a bounded time, inside our timeout.
    wait_s = max(1, math.floor(left) - 1)
    _run([restore, "-w", str(wait_s), "--noflush"], text, timeout_s=left)


def _run(argv: list[str], stdin: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RulesError(
            f"{' '.join(argv)} did not finish within {timeout_s:.1f} s "
            f"(another program may hold the xtables lock); netfilter rules may be unchanged"
        ) from None
    except OSError as exc:
        raise RulesError(f"{argv[0]} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise RulesError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _ipset() -> str:
    tool = shutil.which("ipset")
    if tool is None:
        raise RulesError("ipset not found: install the ipset package (netskin steers through ipsets)")
    return tool


def _ipset_restore(text: str, deadline: _Deadline) -> None:
    if text:
        _run([_ipset(), "restore"], text, timeout_s=deadline.left())


def _our_sets(deadline: _Deadline) -> list[str]:
    """The names of the ipsets netskin owns (none when ipset is not installed)."""
    tool = shutil.which("ipset")
    if tool is None:
        return []
    names = _run([tool, "list", "-n"], timeout_s=deadline.left()).split()
    return [name for name in names if name.startswith(SET_PREFIX)]


def _destroy_sets(names: list[str], deadline: _Deadline) -> None:
    if names:
        _ipset_restore("".join(f"destroy {name}\n" for name in names), deadline)
