"""Delay stage: one-way delay, jitter and optional reordering on a FIFO delay line.

Takes the ready time from the shaper and returns the departure time. Per-pipe state is the
departure of the last packet that went through the line in order.
"""

from __future__ import annotations

from collections.abc import Callable

from interceptor.compiled import DirectionSkin


class DelayLine:
    """Per-pipe delay-line state; survives skin swaps so held packets keep their place in line."""

    __slots__ = ("last_departure_ns",)

    def __init__(self) -> None:
        self.last_departure_ns = 0


def departure(skin: DirectionSkin, line: DelayLine, ready_ns: int, random: Callable[[], float]) -> int:
    """Departure time (ns) of a packet that is ready (shaped) at ``ready_ns``.

    - Reordering: with ``reorder_probability`` the packet is sent ahead of the delay queue, as
      netem's ``reorder`` does: it departs at ``ready_ns`` with no added delay and leaves
      ``last_departure_ns`` alone, so the packets behind it are unaffected.
    - Otherwise the candidate is ``ready + delay_ns + J`` with J a uniform integer in
      [-jitter_ns, +jitter_ns] (netem's default jitter distribution is uniform too), clamped so
      a packet never leaves before it is ready (with jitter > delay this skews the added delay
      upward rather than going negative).
    - The line is FIFO on purpose: the departure is ``max(candidate, last_departure_ns)``.
      netem lets jitter reorder packets and users hate it (TCP reads it as loss and collapses);
      here order is kept unless reordering is asked for. The price: jitter can only add to the
      delay of packets queued behind a late one, so the mean delay rises slightly above
      ``delay_ns`` when jitter is large compared with the packet spacing.
    """
    reorder = skin.reorder_probability
    if reorder and random() < reorder:
        return ready_ns
    departure = ready_ns + skin.delay_ns
    jitter = skin.jitter_ns
    if jitter:
        departure += int((2 * jitter + 1) * random()) - jitter
        if departure < ready_ns:
            departure = ready_ns
    if departure < line.last_departure_ns:
        return line.last_departure_ns
    line.last_departure_ns = departure
    return departure
