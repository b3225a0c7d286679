"""The compiled skin: what the hot path reads.

A skin is validated once (``interceptor.schema``) and compiled into these small immutable
objects. Units are converted up front (nanoseconds, probabilities as floats, rates as
nanoseconds per byte) so that the engine never converts, parses or looks anything up per
packet. Swapping a VM's skin is replacing one reference to a ``CompiledSkin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine imports this module; only type names are needed from it
    from interceptor.engine.dns import CompiledDns
    from interceptor.engine.trace import CompiledTrace
    from interceptor.engine.timeline import CompiledTimeline
    from interceptor.profiles import CompiledProfile

NS_PER_MS = 1_000_000
# The largest GSO super-packet the kernel queues whole (64 KiB of IP packet).
SUPER_PACKET_BYTES = 65_536
# A rate-limited direction takes super-packets only if its queue holds this many of them, so
# one never overflows a queue that segments would have fitted into.
SUPER_PACKETS_QUEUED = 4


@dataclass(frozen=True, slots=True)
class GilbertElliott:
    """Two-state bursty loss (the netem/Pumba ``gemodel`` parameters, as probabilities).

    ``p``: good → bad transition per packet; ``r``: bad → good; ``loss_bad`` and
    ``loss_good``: the probability that a packet is lost in each state.
    """

    p: float
    r: float
    loss_bad: float = 1.0
    loss_good: float = 0.0


@dataclass(frozen=True, slots=True)
class DirectionSkin:
    """Link conditions for one direction (uplink: leaving the VM; downlink: to the VM)."""

    loss_probability: float = 0.0
    gilbert_elliott: GilbertElliott | None = None
    delay_ns: int = 0  # one-way added delay
    jitter_ns: int = 0  # scale of the delay's variation (uniform: [delay - jitter, delay + jitter])
    # Shape of the delay's marginal distribution: "uniform", "normal", "pareto" or "paretonormal"
    # (netem's); the delay is a smooth random process in time with this marginal (engine/delay.py).
    jitter_distribution: str = "uniform"
    jitter_correlation_ns: int = 0  # the process's time scale; 0 = the default, 5 × jitter_ns
    reorder_probability: float = 0.0  # share of packets sent ahead of the delay queue
    ns_per_byte: float = 0.0  # 0 = unlimited; 8e9 / (rate_kbps * 1000) otherwise
    queue_limit_ns: int = 500 * NS_PER_MS  # backlog allowed behind the rate limit
    # Delivery opportunities (Mahimahi) replacing the rate; ns_per_byte is then the trace's mean.
    trace: CompiledTrace | None = None

    @property
    def is_passthrough(self) -> bool:
        return (
            self.loss_probability == 0.0
            and self.gilbert_elliott is None
            and self.delay_ns == 0
            and self.jitter_ns == 0
            and self.ns_per_byte == 0.0
        )

    @property
    def takes_super_packets(self) -> bool:
        """Whether nothing here decides per packet, so a GSO super-packet may stand for its
        segments: no random loss or reordering, no trace, and room in the rate's queue."""
        return (
            self.loss_probability == 0.0
            and self.gilbert_elliott is None
            and self.reorder_probability == 0.0
            and self.trace is None
            and self.ns_per_byte * SUPER_PACKET_BYTES * SUPER_PACKETS_QUEUED <= self.queue_limit_ns
        )


PASSTHROUGH = DirectionSkin()


@dataclass(frozen=True, slots=True)
class CompiledSkin:
    """One VM's whole skin, both directions plus the parts that are not per direction."""

    name: str
    uplink: DirectionSkin = PASSTHROUGH
    downlink: DirectionSkin = PASSTHROUGH
    qos_weight: int = 5  # qos_priority 1..10
    security_profile: str | None = None
    firewall: CompiledProfile | None = None  # the profile, resolved by the daemon; enforced in the kernel
    dns_servers: tuple[str, ...] = ()
    dns: CompiledDns | None = None  # answer rewriting, blocking and delay
    ip_address: str | None = None
    mac_address: str | None = None
    mtu: int | None = None
    optional: frozenset[str] = frozenset()  # identity fields that may stay unset on this host
    # Conditions over time: every step precompiled; the VM's step clock swaps them in (engine/timeline.py).
    timeline: CompiledTimeline | None = None

    def takes_super_packets(self) -> tuple[bool, bool]:
        """(uplink, downlink): may the direction take GSO super-packets in every step of the skin?
        Never with a firewall profile (a verdict per packet), an MTU (a size per packet) or DNS
        answer rewriting."""
        skins = [self]
        if self.timeline is not None:
            skins += [*self.timeline.skins, *(step.end for step in self.timeline.steps)]
        if any(skin.firewall is not None or skin.security_profile or skin.mtu is not None or skin.dns is not None
               for skin in skins):
            return False, False
        return (all(skin.uplink.takes_super_packets for skin in skins),
                all(skin.downlink.takes_super_packets for skin in skins))


NO_SKIN = CompiledSkin(name="")
