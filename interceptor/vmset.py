"""The daemon's VM set: the host config's ``[vms.*]`` plus the VMs libvirt reports, and what each
libvirt event asks of the daemon. Pure: it decides, the daemon (``interceptor.daemon``) acts.

Names. A libvirt VM is named ``DOMAIN`` or, for a domain with several steerable interfaces,
``DOMAIN/IFACE`` (``interceptor.libvirt_source``). Each part must follow the name rule of skins
and ``[vms]`` (``LIBVIRT_NAME_RULE``); a domain or alias outside it is refused with one log line
naming the domain, since the name becomes a state file, a rule comment and a CLI argument. The
``/`` is allowed in libvirt VM names only (a ``[vms]`` name cannot have one); state files escape
it (``interceptor.assignments.file_name``). A ``[vms]`` name wins over a libvirt VM of the same
name: the libvirt one is refused, loudly, and the static VM keeps its skin.

Skins. On ``Appeared`` the assignment stored under the VM's name is put back (a skin follows its
VM across stop/start, whatever tap libvirt gives it); without one, the domain's metadata skin is
applied. The assignment remembers the metadata skin it last acted on (``metadata_skin``): a
metadata change, seen live (``Changed``) or while the domain was shut off (on ``Appeared``), is a
new desired skin and is applied; a removed metadata element reverts the VM to no skin. On
``Gone`` the VM's steering goes; its assignment, shadow and original configuration stay on disk.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from interceptor.libvirt_source import Appeared, Changed, Event, Gone, LibvirtVm

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_LIBVIRT_NAME_RE = re.compile(rf"{_PART}(/{_PART})?")
LIBVIRT_NAME_RULE = ("DOMAIN or DOMAIN/IFACE, each 1–64 letters, digits, '.', '_' or '-', "
                     "starting with a letter or digit")


def libvirt_name_ok(name: str) -> bool:
    return _LIBVIRT_NAME_RE.fullmatch(name) is not None


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddVm:
    """Steer the VM's tap: an engine path, the rules, and its skin (``skin_on_appear``)."""

    vm: LibvirtVm


@dataclass(frozen=True)
class RemoveVm:
    """Take the VM's steering out; keep its assignment."""

    name: str


@dataclass(frozen=True)
class Rewire:
    """The VM's entry changed where the rules see it (tap, bridge, address): re-install them."""

    vm: LibvirtVm


@dataclass(frozen=True)
class UpdateEntry:
    """The VM's entry changed, not where the rules see it (MAC, MTU, skin): keep the new entry;
    its original configuration is the new entry's."""

    vm: LibvirtVm


@dataclass(frozen=True)
class MetadataSkin:
    """The domain's metadata names another skin (None: removed): the new desired skin."""

    name: str
    skin: str | None


@dataclass(frozen=True)
class Refuse:
    """The VM is not steered; ``reason`` is the one log line saying why and what to do."""

    name: str
    reason: str


Action = AddVm | RemoveVm | Rewire | UpdateEntry | MetadataSkin | Refuse

_WIRING = ("tap", "bridge", "address", "address6", "kind")


def actions(event: Event, static: Collection[str], steered: Mapping[str, LibvirtVm]) -> list[Action]:
    """What ``event`` asks of the daemon, given the ``[vms]`` names and the libvirt VMs it steers."""
    vm = event.vm
    if isinstance(event, Gone):
        mine = steered.get(vm.name)
        return [RemoveVm(vm.name)] if mine is not None and mine.uuid == vm.uuid else []
    if isinstance(event, Changed) and vm.name in steered:
        before = steered[vm.name]
        out: list[Action] = []
        if any(getattr(before, key) != getattr(vm, key) for key in _WIRING):
            out.append(Rewire(vm))
        elif before != vm:
            out.append(UpdateEntry(vm))
        if before.skin != vm.skin:
            out.append(MetadataSkin(vm.name, vm.skin))
        return out
    # Appeared, or a change of a VM refused so far (it may be acceptable now): a VM to add.
    if vm.name in static:
        return [Refuse(vm.name, f"libvirt VM {vm.name} (domain {vm.domain}) not steered: [vms.{vm.name}] in the "
                                f"host config has that name and wins; rename one of them")]
    if not libvirt_name_ok(vm.name):
        return [Refuse(vm.name, f"libvirt VM {vm.name!r} (domain {vm.domain!r}) not steered: its name is not "
                                f"valid ({LIBVIRT_NAME_RULE}); rename the domain or give the interface an "
                                f"alias (<alias name='ua-NAME'/>)")]
    if isinstance(event, Appeared) or isinstance(event, Changed):
        return [AddVm(vm)]
    raise TypeError(f"not a libvirt event: {event!r}")


def skin_on_appear(has_assignment: bool, metadata_seen: str | None, metadata: str | None) -> tuple[str, str | None]:
    """What a VM that appears wears: ``("keep", None)`` its stored assignment, ``("apply", SKIN)``
    or ``("revert", None)``. ``metadata_seen``: the metadata skin the assignment last acted on."""
    if not has_assignment:
        return ("apply", metadata) if metadata else ("keep", None)
    if metadata == metadata_seen:
        return ("keep", None)
    return ("apply", metadata) if metadata else ("revert", None)
