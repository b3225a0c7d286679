"""The one schema: host configuration and skins, validated once, used by the daemon and the CLI.

Files are parsed here (TOML, JSON, YAML), checked with pydantic, and every problem is turned into
one line naming the field, the value and what is allowed. ``compile_skin`` turns a valid ``Skin``
into the ``interceptor.compiled.CompiledSkin`` the engine reads; all unit conversion happens there.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import types
import typing
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from interceptor import traces
from interceptor.compiled import NS_PER_MS, CompiledSkin, DirectionSkin, GilbertElliott
from interceptor.engine.dns import CompiledDns, compile_dns
from interceptor.timeline import Timeline

DEFAULT_CONFIG_PATH = Path("/etc/netskin/netskin.toml")
CONFIG_ENV = "NETSKIN_CONFIG"
SKIN_SUFFIXES = (".json", ".yaml", ".yml", ".toml")

# Numbers are strict: a YAML `true` or a quoted "120" is a mistake, not 1 or 120.
Ms = Annotated[float, Field(ge=0, le=60_000, strict=True)]
Percent = Annotated[float, Field(ge=0, le=100, strict=True)]
# The shape of the delay's distribution and the time scale of its change (engine/delay.py).
JitterDistribution = Literal["uniform", "normal", "pareto", "paretonormal"]
CorrelationMs = Annotated[float, Field(ge=0.1, le=600_000, strict=True)]


def _rate_or_unlimited(kbps: float) -> float:
    # Below 1 bit/s the per-byte time overflows; 0 is how "no limit" is written.
    if 0 < kbps < 0.001:
        raise ValueError(
            f"{_show(kbps)} kbit/s is below 1 bit/s (allowed 0 for unlimited, or ≥ 0.001)"
        )
    return kbps


Kbps = Annotated[float, Field(ge=0, strict=True), AfterValidator(_rate_or_unlimited)]

# Skin, profile and VM names become file names and command arguments.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_RULE = "1–64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a valid {what} name (allowed: {_NAME_RULE})")
    return value


class UserError(ValueError):
    """A problem the user can fix (a bad file, an unknown name): one line per problem."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class SkinError(UserError):
    """An invalid skin file or skin document."""


class ConfigError(UserError):
    """An invalid host configuration."""


class _Strict(BaseModel):
    # Unknown keys are errors everywhere: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- host configuration ---------------------------------------------------------------------


class VmConfig(_Strict):
    interface: Annotated[str, Field(min_length=1, max_length=15)]  # Linux IFNAMSIZ - 1
    address: IPv4Address
    address6: IPv6Address | None = None
    netns: str | None = None
    skin: str | None = None

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str) -> str:
        if value in (".", "..") or any(c in value for c in "/: ") or not value.isprintable():
            raise ValueError(f"{_show(value)} is not a valid interface name")
        return value

    @field_validator("skin")
    @classmethod
    def _skin(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "skin")


MAX_WORKERS = 64  # engine workers, each with two queue pairs (see HostConfig.queue_base)
QUEUES_PER_WORKER = 4  # per-segment uplink and downlink, then the GSO pair


class VmQueues(NamedTuple):
    uplink: int
    downlink: int


class StoreConfig(_Strict):
    """The fleet's ``[store]`` table: where etcd is and who this host is in the fleet."""

    endpoints: Annotated[list[Annotated[str, Field(pattern=r"^https?://[^/\s]+/?$")]], Field(min_length=1)]
    host: str | None = None  # this host's name in the fleet; default: the hostname
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "host")

    @model_validator(mode="after")
    def _pairs(self) -> StoreConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file: give both (a client certificate and its key) or neither")
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file: give both (etcd authentication) or neither")
        return self


class LibvirtConfig(_Strict):
    """``[libvirt]``: VMs come from this libvirt connection as well (interceptor.libvirt_source)."""

    # A libvirt connection URI: qemu:///system, qemu+ssh://host/system, qemu+unix:///system?socket=...
    uri: Annotated[str, Field(min_length=1, max_length=4096)]

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9+._-]*://[^\s]*", value):
            raise ValueError(
                f"{_show(value)} is not a libvirt connection URI "
                "(e.g. qemu:///system or qemu+unix:///system?socket=/run/libvirt/libvirt-sock)"
            )
        return value


class HostConfig(_Strict):
    state_dir: Path = Path("/var/lib/netskin")
    skins_dir: Path = Path("/etc/netskin/skins.d")
    control_socket: Path = Path("/run/netskin/control.sock")
    fail_mode: Literal["open", "closed"] = "open"
    host_uplink_kbps: Annotated[int, Field(ge=0, strict=True)] = 0
    # The network namespace the daemon enters at start (the lab's stand-in hypervisor).
    host_netns: str | None = None
    # NFQUEUE numbers are 16 bit. Each engine worker owns a group of whole VMs and two queue
    # pairs: worker k uses queue_base + 4k (uplink) and + 4k + 1 (downlink) for packets judged one
    # segment at a time, + 4k + 2 and + 4k + 3 for GSO super-packets.
    queue_base: Annotated[int, Field(ge=0, le=65_535, strict=True)] = 7700
    # A VM direction whose skin makes no per-packet decision (no loss, reordering, trace, firewall
    # profile, MTU or DNS rewriting; a rate, if any, with room for a 64 KiB super-packet in its
    # queue) takes the kernel's GSO super-packets whole: a TCP stream crosses the queue tens of
    # times less often. False: every direction takes segments.
    gso: bool = True
    # Accepts given while the engine holds nothing (pass-through traffic) go to the kernel as one
    # batch verdict per drain of the queue (at most 16) instead of one system call each.
    batch_verdicts: bool = True
    # Engine workers: each owns whole VMs and serves their queues on its own core, as a child
    # process of the daemon. 0: one per core the daemon may run on but one, at least one: the
    # kernel's forwarding (softirqs) and the VMs need a core too. With a shared host uplink
    # every VM stays in worker 0, in the daemon's process (one weighted scheduler).
    workers: Annotated[int, Field(ge=0, le=MAX_WORKERS, strict=True)] = 0
    # Every worker in a child process, so the daemon's own work (reloads, compiles, applies, the
    # control socket) never holds a data path's GIL or its place on a core. False: worker 0
    # runs in the daemon's process (one process fewer, about 30 MB).
    isolate_data_path: bool = True
    rules_dir: Path | None = None  # extra drop-in directory for firewall profiles
    # Packets one VM may have held per direction (delay, rate queue); more are dropped as
    # "overflow", so one VM's flood cannot exhaust memory or fill its kernel queue.
    max_held_packets: Annotated[int, Field(ge=16, le=1_000_000, strict=True)] = 15_000
    # One packet-mark bit: set on a packet queued from a bridge port, so the kernel's second
    # PREROUTING pass of a bridged-then-routed GSO segment does not queue it twice; cleared in
    # mangle FORWARD/INPUT. Pick a bit no other tool on the host uses.
    steering_mark: Annotated[int, Field(ge=1, le=0x8000_0000, strict=True)] = 0x0010_0000
    # Niceness of the thread that serves the queues (-20 … 19; 0 leaves it as started): under
    # CPU contention a lower value lets it run first when a held packet is due, at a price: it
    # then preempts the senders on every packet and wakes once per packet (see the README).
    data_path_nice: Annotated[int, Field(ge=-20, le=19, strict=True)] = 0
    # The scheduler slice the data path asks for, in µs (Linux 6.12+, sched_setattr; 0 leaves the
    # kernel's default, else 100 … 100000): a shorter slice lets it run first when it wakes (a held
    # packet is due) without a larger share of the CPU, at the same price as a lower niceness:
    # it preempts the senders on every packet (see the README).
    data_path_slice_us: Annotated[int, Field(ge=0, le=100_000, strict=True)] = 0
    vms: dict[str, VmConfig] = {}
    store: StoreConfig | None = None  # a fleet member (netskin agent); None: a single host
    libvirt: LibvirtConfig | None = None  # VMs found through libvirt besides [vms.*]

    @field_validator("data_path_slice_us")
    @classmethod
    def _slice_in_kernel_range(cls, value: int) -> int:
        if 0 < value < 100:
            raise ValueError(f"{value} is out of range (allowed 0 for the kernel's default, or 100–100000)")
        return value

    @field_validator("vms")
    @classmethod
    def _vm_names(cls, vms: dict[str, VmConfig]) -> dict[str, VmConfig]:
        for name in vms:
            _check_name(name, "VM")
        return vms

    @field_validator("steering_mark")
    @classmethod
    def _one_bit(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value:#x} is not a single bit (allowed: one of 0x1, 0x2, … 0x80000000)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> HostConfig:
        last_queue = self.queue_base + QUEUES_PER_WORKER * self.worker_count - 1
        if last_queue > 65_535:
            raise ValueError(
                f"queue_base: {self.queue_base} leaves no room for the queues of {self.worker_count} "
                f"worker(s) (needs queue_base + {QUEUES_PER_WORKER * self.worker_count - 1} ≤ 65535)"
            )
        seen: dict[tuple[str, str], str] = {}
        for name, vm in self.vms.items():
            for key in (("interface", vm.interface), ("address", str(vm.address))):
                if key in seen:
                    raise ValueError(
                        f"vms.{name}.{key[0]}: {_show(key[1])} is already used by vms.{seen[key]}"
                    )
                seen[key] = name
        return self

    @property
    def worker_count(self) -> int:
        """Engine workers in use: ``workers``, or one per core the daemon may run on but one (at
        least one); one with a shared host uplink."""
        if self.host_uplink_kbps:
            return 1
        if self.workers:
            return self.workers
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) - 1))

    def queue_numbers(self, worker: int = 0, gso: bool = False) -> VmQueues:
        """An NFQUEUE pair of engine worker ``worker`` (0-based), shared by the VMs it owns: the
        per-segment pair, or (``gso``) the pair that takes GSO super-packets."""
        first = self.queue_base + QUEUES_PER_WORKER * worker + (2 if gso else 0)
        return VmQueues(first, first + 1)

    def vm_queues(self, vm: str) -> VmQueues:
        """The first worker's per-segment NFQUEUE pair, for a configured VM (its worker is chosen
        by the running daemon: ``status`` shows its queues)."""
        names = list(self.vms)
        if vm not in names:
            raise ConfigError(f"unknown VM {_show(vm)} (configured: {', '.join(names) or 'none'})")
        return self.queue_numbers(0)


def load_host_config(path: str | Path | None = None) -> HostConfig:
    """Read the host configuration: ``path``, else $NETSKIN_CONFIG, else the default path.

    Only a missing *default* file means "use the defaults"; a path the user named must exist.
    Relative paths inside the file are relative to the file's directory.
    """
    explicit = path if path is not None else os.environ.get(CONFIG_ENV) or None
    config_path = Path(explicit) if explicit is not None else DEFAULT_CONFIG_PATH
    if not config_path.exists():
        if explicit is None:
            return HostConfig()
        source = "--config" if path is not None else f"${CONFIG_ENV}"
        raise ConfigError(
            f"{config_path}: no such file (named by {source}); give the host configuration's path"
        )
    data = _read_document(config_path, ConfigError, suffix=".toml")
    try:
        config = HostConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            [f"{config_path}: {line}" for line in format_validation_error(error, HostConfig)]
        ) from None
    base = config_path.parent
    updates = {
        key: base / value
        for key in ("state_dir", "skins_dir", "control_socket", "rules_dir")
        if (value := getattr(config, key)) is not None and not value.is_absolute()
    }
    if config.store is not None:
        store_files = {
            key: base / value
            for key in ("ca_file", "cert_file", "key_file", "password_file")
            if (value := getattr(config.store, key)) is not None and not value.is_absolute()
        }
        updates["store"] = config.store.model_copy(update=store_files)
    return config.model_copy(update=updates)


# --- skins ----------------------------------------------------------------------------------


class Trace(_Strict):
    """A trace-driven link (``uplink.trace`` / ``downlink.trace``), replacing the rate.

    Written as a file name (Mahimahi delivery opportunities; relative names are looked up beside
    the skin file, then in the shipped ``rules/traces``), ``{file: NAME}``, or a series
    ``{interval_ms, kbps: [...]}``. The trace is read and compiled here, during validation, so
    ``skins validate`` reports a bad trace and compiling reuses the result.
    """

    file: Annotated[str, Field(min_length=1)] | None = None
    interval_ms: Annotated[float, Field(ge=traces.MIN_INTERVAL_MS, le=3_600_000, strict=True)] | None = None
    kbps: list[Annotated[float, Field(strict=True)]] | None = None
    _compiled: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _file_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"file": value}
        if not isinstance(value, (dict, Trace)):
            raise ValueError(f"expected a trace file name or {{interval_ms, kbps: [...]}}, got {_kind(value)}")
        return value

    @field_validator("kbps")
    @classmethod
    def _rates(cls, kbps: list[float] | None) -> list[float] | None:
        if kbps is not None:
            if not kbps:
                raise ValueError("the series is empty (give one rate per interval)")
            for index, rate in enumerate(kbps):
                if rate < 0:
                    raise ValueError(f"{_show(rate)} (interval {index}) is negative (allowed ≥ 0)")
        return kbps

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> Trace:
        series = self.interval_ms is not None or self.kbps is not None
        if (self.file is None) == (not series):
            raise ValueError("give a trace file name, or a series {interval_ms, kbps: [...]}, not both")
        try:
            if self.file is not None:
                self._compiled = traces.load_file(self.file, (info.context or {}).get("base_dir"))
            elif self.interval_ms is None or self.kbps is None:
                missing = "interval_ms" if self.interval_ms is None else "kbps"
                raise ValueError(f"a series needs {missing} too")
            else:
                self._compiled = traces.compile_series(self.interval_ms, self.kbps)
        except traces.TraceError as error:
            raise ValueError(str(error)) from None
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        if self.file is not None:
            return self.file
        return {"interval_ms": self.interval_ms, "kbps": self.kbps}

    def compiled(self, base_dir: Path | None = None) -> Any:
        """The ``CompiledTrace`` (loaded during validation; again here if built without it)."""
        if self._compiled is None:
            self._compiled = (traces.load_file(self.file, base_dir) if self.file is not None
                              else traces.compile_series(self.interval_ms, self.kbps))
        return self._compiled


class Direction(_Strict):
    """Per-direction overrides; one-way values (``delay_ms`` is added in this direction only)."""

    delay_ms: Ms | None = None
    jitter_ms: Ms | None = None
    jitter_distribution: JitterDistribution | None = None
    jitter_correlation_ms: CorrelationMs | None = None
    loss_percent: Percent | None = None
    rate_kbps: Kbps | None = None
    trace: Trace | None = None  # delivery opportunities replacing the rate in this direction

    @model_validator(mode="after")
    def _rate_or_trace(self) -> Direction:
        if self.trace is not None and self.rate_kbps is not None:
            raise ValueError("trace: a trace replaces the rate; remove rate_kbps or trace")
        return self


class GilbertElliottPercent(_Strict):
    """Pumba's --pg/--pr/--ph/--pk convention, all in percent."""

    p: Percent  # chance per packet to go good → bad
    r: Percent  # chance per packet to go bad → good
    h: Percent = 100  # loss in the bad state
    k: Percent = 0  # loss in the good state


class LossModel(_Strict):
    gilbert_elliott: GilbertElliottPercent | None = None  # None: independent random loss


_DNS_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_DNS_PATTERN_RULE = "an exact name like host.example or a wildcard like *.example"


def _dns_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    labels = pattern.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(pattern) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{_show(value)} is not a DNS name pattern (allowed: {_DNS_PATTERN_RULE})")
    return pattern


class DnsConfig(_Strict):
    """Answer rewriting. A "*.example" pattern matches names below example, not example itself."""

    rewrite: dict[str, IPvAnyAddress] = {}  # pattern → the address every answer carries
    block: list[str] = []  # patterns answered with NXDOMAIN
    delay_ms: Ms = 0  # added to every DNS answer
    ttl: Annotated[int, Field(ge=0, le=604_800, strict=True)] = 60  # of rewritten answers, s

    @field_validator("rewrite")
    @classmethod
    def _rewrite(cls, rewrite: dict[str, Any]) -> dict[str, Any]:
        return {_dns_pattern(pattern): address for pattern, address in rewrite.items()}

    @field_validator("block")
    @classmethod
    def _block(cls, block: list[str]) -> list[str]:
        return [_dns_pattern(pattern) for pattern in block]


_MAC_RE = re.compile(r"[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}")


class Skin(_Strict):
    """One skin, in either seed format (persona or skin) or the full form.

    After validation the canonical fields are filled whichever alias was given: ``name``,
    ``latency_ms`` (round trip) and ``packet_loss_percent``.
    """

    name: str = ""
    skin_name: str | None = None  # alias of name (skin seed format)
    description: str | None = None

    latency_ms: Ms = 0  # added round-trip time: half in each direction
    simulated_latency_ms: Ms | None = None  # alias of latency_ms (persona seed format)
    jitter_ms: Ms = 0  # applies to each direction as given
    jitter_distribution: JitterDistribution = "uniform"  # the delay's marginal distribution
    jitter_correlation_ms: CorrelationMs | None = None  # None: 5 × jitter_ms
    reorder_percent: Percent = 0
    packet_loss_percent: Percent = 0  # in each direction independently
    packet_loss_probability: Annotated[float, Field(ge=0, le=1, strict=True)] | None = None
    loss_model: LossModel = LossModel()
    bandwidth_limit_kbps: Kbps = 0  # each direction; 0 = unlimited
    queue_limit_ms: Annotated[float, Field(ge=1, le=60_000, strict=True)] = 500
    uplink: Direction | None = None
    downlink: Direction | None = None

    qos_priority: Annotated[int, Field(ge=1, le=10, strict=True)] = 5
    security_profile: str | None = None
    dns_servers: list[IPvAnyAddress] = []
    dns: DnsConfig | None = None
    ip_address: IPv4Address | None = None
    mac_address: str | None = None
    mtu: Annotated[int, Field(ge=68, le=65_535, strict=True)] | None = None
    # Identity fields this skin can do without where the host cannot set them (a VM with no
    # netns cannot get a MAC): applying then succeeds and status says what was left unset.
    optional: list[Literal["mac_address", "mtu"]] = []
    timeline: Timeline | None = None  # conditions that change over time (interceptor.timeline)
    _base_dir: Path | None = PrivateAttr(default=None)  # the skin file's directory (traces)

    @field_validator("name", "skin_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "skin")

    @field_validator("security_profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "security profile")

    @field_validator("loss_model", mode="before")
    @classmethod
    def _loss_model(cls, value: Any) -> Any:
        if value == "random":
            return {}
        if isinstance(value, str):
            raise ValueError(
                f"{_show(value)} is not a loss model "
                f'(allowed: "random" or {{gilbert_elliott: {{p, r, h, k}}}})'
            )
        return value

    @field_serializer("loss_model")
    def _dump_loss_model(self, model: LossModel) -> Any:
        if model.gilbert_elliott is None:
            return "random"
        return {"gilbert_elliott": model.gilbert_elliott.model_dump()}

    @field_validator("mac_address")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.lower()
        if not _MAC_RE.fullmatch(text):
            raise ValueError(f"{_show(value)} is not a MAC address (use aa:bb:cc:dd:ee:ff)")
        digits = text.replace(":", "").replace("-", "")
        octets = [int(digits[i : i + 2], 16) for i in range(0, 12, 2)]
        # The group bit covers broadcast too; an interface can only own a unicast address.
        if octets[0] & 1 or not any(octets):
            raise ValueError(f"{_show(value)} is not a unicast MAC address")
        return ":".join(f"{octet:02x}" for octet in octets)

    @model_validator(mode="after")
    def _resolve_aliases(self, info: ValidationInfo) -> Skin:
        given = self.model_fields_set
        if self.skin_name is not None:
            if "name" in given and self.name != self.skin_name:
                raise ValueError(_conflict("name", self.name, "skin_name", self.skin_name))
            self.name = self.skin_name
        if not self.name:
            default = (info.context or {}).get("default_name")
            if default is None:
                raise ValueError("name: required field is missing (give name or skin_name)")
            try:
                self.name = _check_name(default, "skin")
            except ValueError as error:
                raise ValueError(f"name: {error}; the file name gives it, so add a name field")
        if self.simulated_latency_ms is not None:
            if "latency_ms" in given and self.latency_ms != self.simulated_latency_ms:
                raise ValueError(
                    _conflict(
                        "latency_ms",
                        self.latency_ms,
                        "simulated_latency_ms",
                        self.simulated_latency_ms,
                    )
                )
            self.latency_ms = self.simulated_latency_ms
        if self.packet_loss_probability is not None:
            as_percent = self.packet_loss_probability * 100
            if "packet_loss_percent" in given and not math.isclose(
                self.packet_loss_percent, as_percent, abs_tol=1e-9
            ):
                raise ValueError(
                    _conflict(
                        "packet_loss_percent",
                        self.packet_loss_percent,
                        "packet_loss_probability",
                        self.packet_loss_probability,
                    )
                )
            # Rounded so that 0.07 reads back as 7, not 7.000000000000001.
            self.packet_loss_percent = round(as_percent, 9)
        if self.loss_model.gilbert_elliott is not None and self.packet_loss_percent:
            # Two loss processes at once would make neither number mean what it says.
            raise ValueError(
                "loss_model: gilbert_elliott sets the loss itself; remove packet_loss_percent "
                "(or use uplink/downlink loss_percent for a direction without bursts)"
            )
        return self

    def link(self, direction: Literal["uplink", "downlink"]) -> Direction:
        """The effective one-way conditions in one direction, every field filled.

        The top-level values apply to both directions (latency split in half, the rest as
        given); the direction's own object overrides them field by field.
        """
        override = getattr(self, direction) or Direction()
        return Direction(
            delay_ms=override.delay_ms if override.delay_ms is not None else self.latency_ms / 2,
            jitter_ms=override.jitter_ms if override.jitter_ms is not None else self.jitter_ms,
            jitter_distribution=override.jitter_distribution or self.jitter_distribution,
            jitter_correlation_ms=override.jitter_correlation_ms or self.jitter_correlation_ms,
            loss_percent=(
                override.loss_percent
                if override.loss_percent is not None
                else self.packet_loss_percent
            ),
            rate_kbps=(
                override.rate_kbps if override.rate_kbps is not None else self.bandwidth_limit_kbps
            ),
        )

    def bursty_loss(self, direction: Literal["uplink", "downlink"]) -> GilbertElliottPercent | None:
        """The Gilbert-Elliott model in this direction, unless the direction sets its own loss."""
        override = getattr(self, direction)
        if override is not None and override.loss_percent is not None:
            return None
        return self.loss_model.gilbert_elliott


# Fields that only restate a canonical one; left out when a resolved skin is shown.
SKIN_ALIASES = frozenset({"skin_name", "simulated_latency_ms", "packet_loss_probability"})


def _conflict(field: str, value: Any, alias: str, alias_value: Any) -> str:
    return (
        f"{field}: {_show(value)} conflicts with {alias}: {_show(alias_value)} "
        f"(they mean the same thing; give one)"
    )


def validate_skin(data: Any, default_name: str | None = None, base_dir: str | Path | None = None) -> Skin:
    """Validate a parsed skin document; ``default_name`` is used when it names no skin.

    ``base_dir``: the skin file's directory, where relative trace file names are looked up
    first (then the shipped ``rules/traces``).
    """
    base = None if base_dir is None else Path(base_dir)
    try:
        skin = Skin.model_validate(data, context={"default_name": default_name, "base_dir": base})
    except ValidationError as error:
        raise SkinError(format_validation_error(error, Skin)) from None
    skin._base_dir = base
    if skin.timeline is not None:
        from interceptor.timeline import step_skins  # it validates each step as a skin of this module

        problems = step_skins(skin)[1]
        if problems:
            raise SkinError(problems)
    return skin


def load_skin_file(path: str | Path, default_name: str | None = None) -> Skin:
    """Load one skin file (.json .yaml .yml .toml). Its name defaults to the file stem."""
    return read_skin_file(path, default_name)[1]


def read_skin_file(path: str | Path, default_name: str | None = None) -> tuple[dict, Skin]:
    """The file's document as written (what a shadow copy keeps) and the skin it validates to."""
    path = Path(path)
    data = _read_document(path, SkinError)
    try:
        return data, validate_skin(data, default_name or path.stem, base_dir=path.parent)
    except SkinError as error:
        raise SkinError([f"{path}: {line}" for line in error.lines]) from None


def compile_skin(skin: Skin) -> CompiledSkin:
    """Convert a valid skin into the engine's units: nanoseconds, probabilities, ns per byte."""
    return CompiledSkin(
        name=skin.name,
        uplink=_with_trace(skin, "uplink", _compile_direction(skin, "uplink")),
        downlink=_with_trace(skin, "downlink", _compile_direction(skin, "downlink")),
        qos_weight=skin.qos_priority,
        security_profile=skin.security_profile,
        dns_servers=tuple(str(server) for server in skin.dns_servers),
        ip_address=None if skin.ip_address is None else str(skin.ip_address),
        mac_address=skin.mac_address,
        mtu=skin.mtu,
        optional=frozenset(skin.optional),
        dns=_compile_dns(skin.dns),
    )


def _with_trace(skin: Skin, direction: Literal["uplink", "downlink"], compiled: DirectionSkin) -> DirectionSkin:
    """The direction with its trace, if it has one: the trace replaces the rate, and
    ``ns_per_byte`` carries the trace's mean rate (what status shows; never passthrough)."""
    override = getattr(skin, direction)
    if override is None or override.trace is None:
        return compiled
    try:
        trace = override.trace.compiled(skin._base_dir)
    except traces.TraceError as error:
        raise SkinError(f"{direction}.trace: {error}") from None
    return dataclasses.replace(compiled, ns_per_byte=trace.mean_ns_per_byte, trace=trace)


def _compile_dns(dns: DnsConfig | None) -> CompiledDns | None:
    if dns is None or not (dns.rewrite or dns.block or dns.delay_ms):
        return None
    return compile_dns({pattern: str(address) for pattern, address in dns.rewrite.items()},
                       list(dns.block), dns.ttl, dns.delay_ms)


def compile_document(document: Any, name: str, source: str | Path | None = None) -> CompiledSkin:
    """Validate and compile a stored skin document (a shadow copy, say); ``SkinError`` if invalid.

    ``name`` names the skin when the document itself does not (it came from a file stem).
    ``source``: the file the document came from; relative trace names are looked up beside it.
    """
    base_dir = Path(source).parent if source else None
    return compile_skin(validate_skin(document, default_name=name, base_dir=base_dir))


def _compile_direction(skin: Skin, direction: Literal["uplink", "downlink"]) -> DirectionSkin:
    link = skin.link(direction)
    bursty = skin.bursty_loss(direction)
    gilbert_elliott = None
    if bursty is not None:
        gilbert_elliott = GilbertElliott(
            p=bursty.p / 100, r=bursty.r / 100, loss_bad=bursty.h / 100, loss_good=bursty.k / 100
        )
    return DirectionSkin(
        loss_probability=0.0 if bursty else link.loss_percent / 100,
        gilbert_elliott=gilbert_elliott,
        delay_ns=round(link.delay_ms * NS_PER_MS),
        jitter_ns=round(link.jitter_ms * NS_PER_MS),
        jitter_distribution=link.jitter_distribution,
        jitter_correlation_ns=round((link.jitter_correlation_ms or 0) * NS_PER_MS),  # 0: default
        reorder_probability=skin.reorder_percent / 100,
        # 1 kbps = 1000 bit/s, so one byte takes 8 / (kbps * 1000) s = 8e6 / kbps ns.
        ns_per_byte=8e6 / link.rate_kbps if link.rate_kbps else 0.0,
        queue_limit_ns=round(skin.queue_limit_ms * NS_PER_MS),
    )


# --- files and error messages ----------------------------------------------------------------


def _read_document(path: Path, error: type[UserError], suffix: str | None = None) -> dict:
    """Parse a JSON, YAML or TOML file into a dict; any failure is one line naming the file."""
    suffix = suffix or path.suffix.lower()
    if suffix not in SKIN_SUFFIXES:
        raise error(
            f"{path}: unsupported file type {_show(path.suffix)} (use .json, .yaml, .yml or .toml)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"{path}: cannot read: {reason}") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise error(f"{path}: not valid JSON: {exc.msg} ({where})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}: not valid YAML: {problem}{where}") from None
    if data is None:
        raise error(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise error(f"{path}: expected a table of fields at the top level, got {_kind(data)}")
    return data


def format_validation_error(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem: the field path, the value and what is allowed."""
    return [_format_one(detail, model) for detail in error.errors()]


def _format_one(detail: Any, model: type[BaseModel]) -> str:
    loc = detail["loc"]
    kind = detail["type"]
    value = detail.get("input")
    ctx = detail.get("ctx", {})
    where = _loc(loc)
    if kind == "value_error":
        message = str(ctx.get("error", detail["msg"]))
        return f"{where}: {message}" if where else message
    if kind == "extra_forbidden":
        parent = _walk(model, loc[:-1])
        allowed = list(parent.model_fields) if _is_model(parent) else []
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"{where}: unknown field{hint} (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return f"{where}: required field is missing"
    allowed = _allowed_range(model, loc)
    in_range = f" (allowed {allowed})" if allowed else ""
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{where}: {_show(value)} is out of range{in_range}"
    if kind == "finite_number":
        return f"{where}: {_show(value)} is not a finite number{in_range}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where}: {_show(value)} is not a whole number{in_range}"
    if kind in ("float_type", "float_parsing"):
        return f"{where}: {_show(value)} is not a number{in_range}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", '"')
        return f"{where}: {_show(value)} is not allowed (allowed: {expected})"
    if kind == "string_too_long":
        limit = ctx["max_length"]
        return f"{where}: {_show(value)} is too long (allowed at most {limit} characters)"
    if kind == "string_too_short":
        return f"{where}: must not be empty"
    if kind == "ip_v4_address":
        return f"{where}: {_show(value)} is not an IPv4 address"
    if kind == "ip_v6_address":
        return f"{where}: {_show(value)} is not an IPv6 address"
    if kind == "ip_any_address":
        return f"{where}: {_show(value)} is not an IP address"
    if kind == "string_type":
        return f"{where}: expected text, got {_kind(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{where}: expected a table of fields, got {_kind(value)}"
    if kind == "list_type":
        return f"{where}: expected a list, got {_kind(value)}"
    return f"{where}: {_show(value)}: {detail['msg']}"


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            parts.append(f".{part}" if parts else part)
        else:
            parts.append(f"[{json.dumps(part)}]")
    return "".join(parts)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(model: Any, loc: tuple) -> Any:
    """The type found at ``loc`` inside ``model``: a model class, a plain type or a FieldInfo."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if _is_model(current) and part in current.model_fields:
            current = current.model_fields[part]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        elif typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        else:
            return None
    return _unwrap(current)


def _unwrap(tp: Any) -> Any:
    """Strip Optional and step from a FieldInfo to its annotation (keeping constraints aside)."""
    if hasattr(tp, "annotation") and hasattr(tp, "metadata"):
        tp = tp.annotation
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        tp = members[0] if len(members) == 1 else tp
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _allowed_range(model: type[BaseModel], loc: tuple) -> str:
    parent = _walk(model, loc[:-1])
    if not _is_model(parent) or loc[-1] not in parent.model_fields:
        return ""
    field = parent.model_fields[loc[-1]]
    metadata = list(field.metadata)
    # Constraints on an Optional member live inside the Annotated argument of the union.
    for arg in typing.get_args(field.annotation):
        if typing.get_origin(arg) is Annotated:
            for extra in typing.get_args(arg)[1:]:
                metadata.extend(getattr(extra, "metadata", [extra]))
    bounds: dict[str, Any] = {}
    for item in metadata:
        for kind, attr in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(item, kind):
                bounds[attr] = getattr(item, attr)
    if "ge" in bounds and "le" in bounds:
        return f"{_num(bounds['ge'])}–{_num(bounds['le'])}"
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return " and ".join(f"{symbols[k]} {_num(v)}" for k, v in bounds.items())


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: Any) -> str:
    """A value as the user wrote it in the file: numbers bare, text quoted, long values cut."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))  # 3.0 after conversion was most likely written 3
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    names = {
        dict: "a table",
        list: "a list",
        str: "text",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "nothing",
    }
    return names.get(type(value), f"a {type(value).__name__}")
