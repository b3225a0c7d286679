"""The step clock: which precompiled skin of a timeline is in force at a given instant, sans-IO.

A timeline is compiled up front (``interceptor.timeline``) into ``CompiledStep``s, each a tuple of
``CompiledSkin``s: one for a plain step, one per update slice for a ramp. ``StepClock`` walks them
in order as the caller's clock passes ``next_change_ns``; ``VmPath`` asks it only then, so the
per-packet cost is one integer comparison, and each change is the same reference swap as
``VmPath.set_skin``. Nothing here reads a clock: times are monotonic nanoseconds passed in.

Theory of operation
-------------------
Play order is fixed: step 0, 1, … of cycle 0, then of cycle 1, … With ``jitter`` each step's
length is ``length_ns × (1 + jitter × (2u − 1))`` with u drawn from ``random.Random(seed)``, one
draw per step played, in play order; so replaying from ``start_ns`` with the same seed gives the
same schedule (a restarted daemon finds itself in phase). A ramp step of n slices changes skin at
``step_start + length × k // n``. After the last cycle of a counted ``repeat`` the last step's
``end`` skin (its ``set`` values exactly) holds for good. Before ``start_ns`` the base skin holds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from interceptor.compiled import CompiledSkin

NEVER_NS = 1 << 63  # "no change coming": larger than any monotonic reading


@dataclass(frozen=True, slots=True)
class CompiledStep:
    """One step: its nominal length and the skins it plays, in order, over that length."""

    length_ns: int
    skins: tuple[CompiledSkin, ...]  # one, or one per update slice of a ramp
    end: CompiledSkin  # the step's own values (a ramp's target): what a finished timeline holds
    ramp: tuple[tuple[str, float, float], ...] = ()  # (field, from, to), for status


@dataclass(frozen=True, slots=True)
class CompiledTimeline:
    steps: tuple[CompiledStep, ...]
    repeat: int | None = None  # cycles to play; None: forever
    jitter: float = 0.0  # ± fraction of each step's length
    seed: int | None = None  # None: the daemon picks one per apply (and persists it)
    start_unix_ns: int | None = None  # None: the moment the skin is applied

    @property
    def skins(self) -> tuple[CompiledSkin, ...]:
        """Every precompiled skin, in play order within one cycle."""
        return tuple(skin for step in self.steps for skin in step.skins)

    @property
    def period_ns(self) -> int:
        return sum(step.length_ns for step in self.steps)


class StepClock:
    """Where a timeline is: ``advance(now_ns)`` returns the skin in force; O(1) amortised.

    Time only moves forward: ``advance`` with an earlier time than the last one changes nothing.
    """

    __slots__ = ("timeline", "start_ns", "base", "skin", "next_change_ns", "cycle", "index", "slice",
                 "step_start_ns", "step_length_ns", "finished", "_rng", "_played")

    def __init__(self, timeline: CompiledTimeline, start_ns: int, base: CompiledSkin, seed: int = 0) -> None:
        self.timeline = timeline
        self.start_ns = start_ns
        self.base = base
        self.skin: CompiledSkin = base
        self.next_change_ns = start_ns
        self.cycle = -1  # -1: not started yet
        self.index = len(timeline.steps) - 1  # so that the first step played is step 0
        self.slice = 0
        self.step_start_ns = start_ns
        self.step_length_ns = 0
        self.finished = False
        self._rng = random.Random(seed if timeline.seed is None else timeline.seed)
        self._played = 0  # steps begun so far (draws taken from the generator)

    def advance(self, now_ns: int) -> CompiledSkin:
        """The skin in force at ``now_ns`` (moving the clock there)."""
        if now_ns < self.next_change_ns:
            return self.skin
        timeline = self.timeline
        if not timeline.jitter and not self.finished and self.cycle >= 0:
            # Without jitter the schedule is periodic: skip whole cycles instead of walking them.
            period = timeline.period_ns
            cycle_start = self.step_start_ns - sum(s.length_ns for s in timeline.steps[: self.index])
            skip = (now_ns - cycle_start) // period - 1
            if skip > 0:
                if timeline.repeat is not None:
                    skip = min(skip, timeline.repeat - 1 - self.cycle)
                if skip > 0:
                    self.cycle += skip
                    self.step_start_ns += skip * period
                    self.next_change_ns = self.step_start_ns + self._boundary(self.slice + 1)
        while now_ns >= self.next_change_ns:
            self._next()
        return self.skin

    def _boundary(self, k: int) -> int:
        """Offset of the k-th slice boundary from the step's start (k = slices: its end)."""
        slices = len(self.timeline.steps[self.index].skins)
        return self.step_length_ns * k // slices

    def _next(self) -> None:
        steps = self.timeline.steps
        step = steps[self.index] if self.cycle >= 0 else None
        if step is not None and self.slice + 1 < len(step.skins):
            self.slice += 1
            self.skin = step.skins[self.slice]
            self.next_change_ns = self.step_start_ns + self._boundary(self.slice + 1)
            return
        start = self.step_start_ns + self.step_length_ns if self.cycle >= 0 else self.start_ns
        index = self.index + 1
        cycle = self.cycle
        if index == len(steps):
            index = 0
            cycle += 1
            repeat = self.timeline.repeat
            if repeat is not None and cycle >= repeat:
                self.finished = True
                self.skin = steps[-1].end
                self.step_start_ns = start
                self.step_length_ns = 0
                self.next_change_ns = NEVER_NS
                return
        self.index, self.cycle, self.slice = index, cycle, 0
        length = steps[index].length_ns
        jitter = self.timeline.jitter
        if jitter:
            length = round(length * (1.0 + jitter * (2.0 * self._rng.random() - 1.0)))
        self._played += 1
        self.step_start_ns = start
        self.step_length_ns = length
        self.skin = steps[index].skins[0]
        self.next_change_ns = start + self._boundary(1)

    def position(self, now_ns: int) -> dict:
        """Where the timeline is at ``now_ns``, for status (advances the clock there)."""
        self.advance(now_ns)
        timeline = self.timeline
        steps = len(timeline.steps)
        out: dict = {"steps": steps, "repeat": "forever" if timeline.repeat is None else timeline.repeat}
        if self.cycle < 0:
            out.update(state="waiting", step=None, cycle=None,
                       next_change_in_ms=round((self.next_change_ns - now_ns) / 1e6, 1))
            return out
        if self.finished:
            out.update(state="holding", step=steps, cycle=timeline.repeat, next_change_in_ms=None)
            return out
        step = timeline.steps[self.index]
        step_end_ns = self.step_start_ns + self.step_length_ns
        out.update(state="running", step=self.index + 1, cycle=self.cycle + 1,
                   next_change_in_ms=round((step_end_ns - now_ns) / 1e6, 1))
        if step.ramp:
            done = (self.slice + 1) / len(step.skins)
            out["ramp"] = {name: {"from": low, "to": high, "now": round(low + (high - low) * done, 3)}
                           for name, low, high in step.ramp}
        return out
