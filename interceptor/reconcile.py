"""Identity reconciliation: bring one VM's MAC, MTU, NAT and address claim in line with its skin.

The daemon's trio thread takes a snapshot (``IdentityJob``: immutable inputs only), a worker
thread runs ``reconcile`` on it (netlink and iptables round trips, blocking), and the trio thread
applies the returned ``IdentityResult``. The worker never reads or writes live daemon state.
``cannot_enforce`` answers at once, before any swap, what the host knows it cannot set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interceptor import identity, nat, rules
from interceptor.compiled import CompiledSkin
from interceptor.schema import VmConfig


@dataclass(frozen=True)
class IdentityJob:
    vm: str
    config: VmConfig
    skin: CompiledSkin
    original: dict | None  # the VM's original configuration (``identity.Original`` as JSON)
    claimed: str | None  # the skin address claimed on the host for this VM now
    nat_wanted: tuple  # every VM's NAT plan that needs rules, with this VM's new one
    nat_installed: tuple | None  # what the NAT chains hold now (None: unknown, e.g. at start)
    dns_targets: dict = field(default_factory=dict)  # {4: server, 6: server} for this VM


@dataclass
class IdentityResult:
    state: dict
    problems: list[str]
    claimed: str | None
    nat_installed: tuple | None


def cannot_enforce(config: VmConfig, skin: CompiledSkin, *, domain: str | None = None) -> list[str]:
    """Identity fields of ``skin`` the host knows at once it cannot set on this VM (and that the
    skin does not list in ``optional``), each as one line saying why and what would make it work.

    ``domain``: the VM is an interface of this libvirt domain. libvirt does not change a running
    domain's MAC or MTU either (9.0 refuses both live updates: the MAC is how it finds the
    device, and "cannot modify MTU"), so the way is the domain's XML and a restart.
    """
    found = []
    if domain is not None:
        where = f"VM of libvirt domain {domain}, which libvirt cannot change while it runs"
        fix = f"set it in the domain's XML (virsh edit {domain}) and restart the domain, or add optional = "
    else:
        where = f"interface {config.interface} has no netns in the host config"
        fix = "add optional = "
    if skin.mac_address is not None and config.netns is None and "mac_address" not in skin.optional:
        found.append(
            f"mac_address {skin.mac_address}: the host cannot set the MAC inside a guest ({where}); "
            f"{fix}[\"mac_address\"] to the skin to apply it without the MAC"
        )
    if skin.mtu is not None and config.netns is None and "mtu" not in skin.optional:
        found.append(
            f"mtu {skin.mtu}: the host cannot set the MTU of the guest's own interface ({where}); "
            f"{fix}[\"mtu\"] to the skin to enforce it on the path only (the host side of "
            f"{config.interface} at {skin.mtu}: larger packets get frag-needed / packet-too-big)"
        )
    return found


def wanted_identity(job: IdentityJob) -> dict:
    """The identity the VM should have now: its skin's fields, else its original ones."""
    skin, original = job.skin, job.original or {}
    return {
        "mac": skin.mac_address or original.get("mac"),
        "mtu": skin.mtu or original.get("mtu"),
        "host_mtu": skin.mtu or original.get("host_mtu"),
        "ip_address": skin.ip_address,
        "dns_servers": list(skin.dns_servers),
    }


def reconcile(job: IdentityJob) -> IdentityResult:
    """Blocking: make the kernel match ``job``; report what was done and what could not be."""
    vm, vm_config, skin = job.vm, job.config, job.skin
    wanted = wanted_identity(job)
    problems: list[str] = []
    unset: list[str] = []
    state: dict = {"asked": wanted, "unset": unset}
    original_obj = identity.Original.from_json(job.original) if job.original else None
    current: dict = {}
    if original_obj is not None:
        try:
            current = identity.read(vm_config, original_obj, vm_name=vm)
        except identity.IdentityError as exc:
            problems.append(f"identity not readable: {exc}")
    setters = {
        "mac": lambda mac: identity.set_mac(vm_config, mac, vm_name=vm),
        "mtu": lambda mtu: identity.set_mtu(vm_config, mtu, original_obj, vm_name=vm),
    }
    # Without a netns the host only sees the VM's MAC in its neighbour table; it never sets it
    # unless a skin asks (and ``cannot_enforce`` refuses that unless the skin made it optional).
    if vm_config.netns is None and skin.mac_address is None:
        wanted["mac"] = None
    # Nor does it see or set the guest's own MTU: a skin's mtu is the host side's (the path).
    if vm_config.netns is None:
        wanted["mtu"] = None
    failed: set[str] = set()
    differs = [key for key in ("mac", "mtu", "host_mtu") if wanted[key] is not None
               and current.get(key) != wanted[key]]
    if differs and skin.mac_address is None and skin.mtu is None and original_obj is not None:
        # Back to the original (revert, or a skin without identity): restore() puts each end
        # back as it was, even where the VM's and the host's MTUs differed.
        try:
            identity.restore(vm_config, original_obj, vm_name=vm)
        except identity.IdentityError as exc:
            problems.append(f"original identity not restored: {exc}")
        differs = []
    mtu_key = "mtu" if vm_config.netns is not None else "host_mtu"
    for field_name, key in (("mac_address", "mac"), ("mtu", mtu_key)):
        want = wanted[key]
        if want is None or (key not in differs and (key != "mtu" or "host_mtu" not in differs)):
            continue
        try:
            setters["mac" if key == "mac" else "mtu"](want)
        except identity.IdentityError as exc:
            failed.add(key)
            if getattr(skin, field_name) is not None and field_name in skin.optional:
                unset.append(f"{field_name}: {exc}")
            else:
                problems.append(f"{field_name} {want} not set: {exc}")
    # The skin's address: peers must be able to reach it, then NAT maps it to the VM.
    claimed = job.claimed
    if claimed is not None and claimed != skin.ip_address:
        try:
            identity.release_address(claimed, vm_config, vm_name=vm)
            claimed = None
        except identity.IdentityError as exc:
            problems.append(f"ip_address {claimed} not released: {exc}")
    if skin.ip_address is not None and claimed is None:
        try:
            identity.claim_address(skin.ip_address, vm_config, vm_name=vm)
            claimed = skin.ip_address
        except identity.IdentityError as exc:
            problems.append(f"ip_address {skin.ip_address} not claimed: {exc}")
    # Only VMs that need translation get rules; with none, no nat chains exist at all (and the
    # kernel does not start tracking connections for netskin's sake).
    installed = job.nat_installed
    if job.nat_wanted != installed:
        try:
            if job.nat_wanted:
                nat.install_nat(list(job.nat_wanted))
            else:
                nat.remove_nat()  # also what a crashed run left behind
            installed = job.nat_wanted
        except (rules.RulesError, ValueError, OSError) as exc:
            problems.append(f"NAT rules not installed: {exc}")
    if original_obj is not None:
        try:
            current = identity.read(vm_config, original_obj, vm_name=vm)
        except identity.IdentityError as exc:
            problems.append(f"identity not readable: {exc}")
    for key in ("mac", "mtu", "host_mtu"):
        if wanted[key] is not None and key in current and current[key] != wanted[key] \
                and key not in failed and (key != "host_mtu" or "mtu" not in failed):
            problems.append(f"{key} reads back {current[key]!r}, asked {wanted[key]!r}")
    state.update(current=current, nat={"ip_address": skin.ip_address, "dns4": job.dns_targets.get(4),
                                       "dns6": job.dns_targets.get(6)})
    return IdentityResult(state=state, problems=problems, claimed=claimed, nat_installed=installed)
