"""Delay stage: one-way delay, jitter and optional reordering on a FIFO delay line.

Takes the ready time from the shaper and returns the departure time. Per-pipe state (the
``DelayLine``) is the last in-order departure and the jitter process; it survives skin swaps.

Theory of operation
-------------------

Jitter is not a fresh draw per packet. Independent draws cannot keep packet order without
inflating the delay: a packet that must not overtake the latest one ahead of it waits for it,
so at 1000 packets/s ``delay 20 ms ± 10 ms`` becomes roughly 26 ± 3 ms. Real queueing delay
is correlated in time, and a FIFO's delay can fall at most as fast as time passes. So the
added delay is a random *process* in time, ``delay(t) = delay_ns + jitter_ns · Q(Φ(z(t)))``:

- ``z(t)`` is a stationary Gaussian process with N(0, 1) marginal, smooth in time. Knots
  ``z_k`` are independent N(0, 1) draws every ``T = jitter_correlation_ns``, and between two
  knots ``z(t) = z_k cos θ + z_{k+1} sin θ`` with ``θ = (π/2)(t − t_k)/T``. Since
  ``cos² θ + sin² θ = 1`` and the knots are independent, ``z(t)`` is exactly N(0, 1) at every
  instant; the knot grid starts at a random phase, so no instant is special. Values more than
  2T apart are independent.
- ``Q(Φ(z))`` maps it to the asked marginal (a Gaussian copula): ``Φ(z)`` is uniform on (0, 1)
  and ``Q`` is the quantile function of the distribution, in units of ``jitter_ns``:

  ``uniform``       2Φ(z) − 1 = erf(z/√2): uniform on [delay − jitter, delay + jitter]
                    (netem's default)
  ``normal``        z: normal with mean delay and standard deviation jitter (netem's table is
                    the same, cut at about ±3.4σ)
  ``pareto``        netem's table: (4/3)·((1 − p)^(−1/3) − 1.5), capped at 32767/8192 ≈ 4,
                    i.e. a Pareto with shape 3 and scale 1, centred on its mean 1.5 and
                    scaled by 4/3, then capped (the top 1.1 %); p10/p50/p90 = −0.62/−0.32/+0.87
  ``paretonormal``  netem's table: ¼·Φ⁻¹(p) + ¾·(the pareto above), the two quantile functions
                    summed at the same p, capped the same way; p10/p50/p90 = −0.78/−0.24/+0.97

Why this process and not an Ornstein–Uhlenbeck one: an OU path is rough, its change over a
gap Δt has standard deviation ∝ √Δt, which beats Δt itself at small gaps, so at thousands of
packets per second consecutive packets would swap unless the time constant were hours long.
Here the slope is finite: for ``normal`` it is N(0, (π/2 · jitter/T)²), so with the default
``T = 10 × jitter`` a delay falling faster than time passes (the only way a later packet could
depart first) is a 6σ event; for ``uniform`` the slope is at most 0.8 of that. The heavy upper
tail of ``pareto``/``paretonormal`` is steeper: there the order-keeping ``max`` below acts now
and then and holds a packet a little longer, only while the delay falls from a peak.

The line is FIFO on purpose: the departure is ``max(candidate, last_departure_ns)``. netem lets
jitter reorder packets and users hate it (TCP reads it as loss and collapses); here order is
kept unless reordering is asked for. Delays below zero (jitter reaching past the delay) are
clamped to zero (1 ns): a packet never departs before it is ready.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from interceptor.compiled import DirectionSkin

_erf = math.erf
_erfc = math.erfc
_cos = math.cos
_sin = math.sin
_HALF_PI = math.pi / 2
_TWO_PI = 2 * math.pi
_INV_SQRT2 = 1 / math.sqrt(2)
DEFAULT_CORRELATION_PER_JITTER = 5  # T = 5 × jitter when jitter_correlation_ns is 0 (see above)
# netem's pareto table stores int16 values scaled by NETEM_DIST_SCALE (8192): capped here.
_PARETO_CAP = 32767 / 8192
_PARETO_CAP_TAIL = ((_PARETO_CAP * 3 / 4) + 1.5) ** -3  # 1 − p at which the cap is reached
_NO_KNOT = -(1 << 62)  # no jittered packet yet: every time is "past the interval"


class DelayLine:
    """Per-pipe delay-line state; survives skin swaps so held packets keep their place in line
    and the jitter process goes on where it was."""

    __slots__ = ("last_departure_ns", "knot_ns", "z_from", "z_to")

    def __init__(self) -> None:
        self.last_departure_ns = 0
        self.knot_ns = _NO_KNOT  # start of the current knot interval
        self.z_from = 0.0  # the process at knot_ns
        self.z_to = 0.0  # ... and at knot_ns + T


def departure(skin: DirectionSkin, line: DelayLine, ready_ns: int, random: Callable[[], float]) -> int:
    """Departure time (ns) of a packet that is ready (shaped) at ``ready_ns``.

    - Reordering: with ``reorder_probability`` the packet is sent ahead of the delay queue, as
      netem's ``reorder`` does: it departs at ``ready_ns`` with no added delay and leaves the
      line alone, so the packets behind it are unaffected.
    - Otherwise the candidate is ``ready + delay(ready)`` (module docstring), never before
      ``ready``, and the departure is ``max(candidate, last_departure_ns)``.
    """
    reorder = skin.reorder_probability
    if reorder and random() < reorder:
        return ready_ns
    departure = ready_ns + skin.delay_ns
    jitter = skin.jitter_ns
    if jitter:
        departure += jitter_offset_ns(skin, line, ready_ns, random)
        if departure <= ready_ns:
            # Clamped (jitter reaching below zero delay): 1 ns, not 0, so the packet is held
            # rather than accepted on arrival, where it could pass one ahead of it that is due
            # but not yet released by the shell.
            departure = ready_ns + 1
    if departure < line.last_departure_ns:
        return line.last_departure_ns
    line.last_departure_ns = departure
    return departure


def jitter_offset_ns(skin: DirectionSkin, line: DelayLine, at_ns: int, random: Callable[[], float]) -> int:
    """The jitter process at ``at_ns``: the delay's offset from ``delay_ns`` (may be negative)."""
    jitter = skin.jitter_ns
    span = skin.jitter_correlation_ns or DEFAULT_CORRELATION_PER_JITTER * jitter
    elapsed = at_ns - line.knot_ns
    if elapsed >= span or elapsed < 0:
        elapsed = _advance(line, at_ns, span, random)
    theta = elapsed * _HALF_PI / span
    z = line.z_from * _cos(theta) + line.z_to * _sin(theta)
    shape = skin.jitter_distribution
    if shape == "uniform":
        return int(jitter * _erf(z * _INV_SQRT2))
    if shape == "normal":
        return int(jitter * z)
    if shape == "pareto":
        return int(jitter * _pareto(z))
    if shape == "paretonormal":
        mixed = 0.25 * z + 0.75 * _pareto(z)
        return int(jitter * (mixed if mixed < _PARETO_CAP else _PARETO_CAP))
    raise ValueError(f"unknown jitter distribution {shape!r} in {skin!r}")


def _advance(line: DelayLine, at_ns: int, span: int, random: Callable[[], float]) -> int:
    """Move the knot interval forward to the one holding ``at_ns``; its offset into it (ns)."""
    knot = line.knot_ns
    if knot == _NO_KNOT:  # the first jittered packet: start the knot grid at a random phase
        line.knot_ns = at_ns - int(span * random())
        line.z_from = _gauss(random)
        line.z_to = _gauss(random)
        return at_ns - line.knot_ns
    elapsed = at_ns - knot
    if elapsed < 0:  # ready before the current interval began (not seen in practice): its start
        return 0
    skipped = elapsed // span
    if skipped == 1:
        line.z_from = line.z_to
    else:  # idle for over a knot interval: both knots are new and independent of the past
        line.z_from = _gauss(random)
    line.z_to = _gauss(random)
    line.knot_ns = knot + skipped * span
    return elapsed - skipped * span


def _pareto(z: float) -> float:
    """netem's pareto quantile at p = Φ(z), from the upper tail 1 − p = Φ(−z) for precision."""
    tail = 0.5 * _erfc(z * _INV_SQRT2)
    if tail <= _PARETO_CAP_TAIL:
        return _PARETO_CAP
    return (4 / 3) * (tail ** (-1 / 3) - 1.5)


def _gauss(random: Callable[[], float]) -> float:
    """A N(0, 1) draw from two uniform draws (Box–Muller); once per knot, not per packet."""
    return math.sqrt(-2.0 * math.log(1.0 - random())) * _cos(_TWO_PI * random())
