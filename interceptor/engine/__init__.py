"""The sans-IO engine core: per-packet decisions from a compiled skin, a time and a random source.

Never reads a clock, never sleeps, never imports trio or netfilterqueue: the shell passes
``now_ns`` and ``random`` in and turns decisions into verdicts. One file per pipeline stage.
"""

from .decision import (
    ACCEPT,
    DROP_ERROR,
    DROP_FIREWALL,
    DROP_LOSS,
    DROP_MTU,
    DROP_OVERFLOW,
    DROP_QUEUE,
    Accept,
    Drop,
    Hold,
)
from .delay import DelayLine, departure
from .loss import LossState, lose
from .pipe import Pipe
from .qos import QUANTUM_BYTES, Flow, SharedLink
from .shaper import RateClock, backlog_ns, shape

__all__ = [
    "ACCEPT",
    "DROP_ERROR",
    "DROP_FIREWALL",
    "DROP_OVERFLOW",
    "DROP_MTU",
    "DROP_LOSS",
    "DROP_QUEUE",
    "QUANTUM_BYTES",
    "Accept",
    "DelayLine",
    "Drop",
    "Flow",
    "Hold",
    "LossState",
    "Pipe",
    "RateClock",
    "SharedLink",
    "backlog_ns",
    "departure",
    "lose",
    "shape",
]
