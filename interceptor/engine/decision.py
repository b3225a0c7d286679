"""What the engine tells the shell to do with one packet.

The engine returns one of these per packet; the shell turns it into an NFQUEUE verdict, either
now (``Accept``, ``Drop``) or when its timer reaches ``Hold.departure_ns``. Accept and the
common drops are module singletons so that the hot path allocates nothing for them; only a held
packet costs one small ``Hold``.
"""

from __future__ import annotations


class Accept:
    """Verdict the packet accept now. Use the ``ACCEPT`` singleton."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ACCEPT"


ACCEPT = Accept()


class Drop:
    """Verdict the packet drop now; ``reason`` names the stage ("loss", "queue", "firewall", ...)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return other.__class__ is Drop and other.reason == self.reason  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((Drop, self.reason))

    def __repr__(self) -> str:
        return f"Drop({self.reason!r})"


DROP_LOSS = Drop("loss")  # random or Gilbert-Elliott loss
DROP_QUEUE = Drop("queue")  # tail drop behind the rate limit (or the shared uplink)
DROP_FIREWALL = Drop("firewall")  # the security profile's drop or reject
DROP_MTU = Drop("mtu")  # larger than the skin's MTU and not allowed to fragment
DROP_OVERFLOW = Drop("overflow")  # the VM already has as many packets held as it may
DROP_ERROR = Drop("error")  # handling the packet raised; dropped because fail_mode is "closed"


class Hold:
    """Keep the packet and verdict it accept at ``departure_ns`` (the shell's clock, in ns)."""

    __slots__ = ("departure_ns",)

    def __init__(self, departure_ns: int) -> None:
        self.departure_ns = departure_ns

    def __eq__(self, other: object) -> bool:
        return other.__class__ is Hold and other.departure_ns == self.departure_ns  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((Hold, self.departure_ns))

    def __repr__(self) -> str:
        return f"Hold({self.departure_ns})"
