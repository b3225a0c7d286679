"""Loss stage: random (Bernoulli) loss and Gilbert-Elliott bursty loss.

Pure functions of the skin, a small per-pipe state and a random source (a zero-argument
callable returning a float in [0, 1): ``random.random`` in the shell, a seeded
``Random().random`` in tests). No clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from interceptor.compiled import DirectionSkin


class LossState:
    """Per-pipe Gilbert-Elliott state. It survives skin swaps; a fresh pipe starts good."""

    __slots__ = ("bad",)

    def __init__(self) -> None:
        self.bad = False


def lose(skin: DirectionSkin, state: LossState, random: Callable[[], float]) -> bool:
    """Whether this packet is lost.

    With ``skin.gilbert_elliott`` set, the two-state model replaces ``loss_probability``.

    Order within one packet, as netem's ``loss_gilb_ell`` (sch_netem.c) does it: first draw
    the state transition (good→bad with ``p``, bad→good with ``r``), then draw the loss with the
    loss probability of the state the packet *found* — netem's ``switch (clg->state)`` picks
    the branch before the transition, so a packet that triggers good→bad is still judged with
    ``loss_good`` and the new state applies from the next packet on. We keep netem's order (and
    its draw order) so that numbers people tuned with ``tc ... loss gemodel`` mean the same
    here. The alternative (judge with the post-transition state) has the same stationary loss
    rate p/(p+r)·loss_bad + r/(p+r)·loss_good and the same burst lengths (mean 1/r when
    loss_bad=1, loss_good=0); it only shifts the state sequence by one packet.

    A draw is skipped when its probability is 0, which changes nothing observable.
    """
    ge = skin.gilbert_elliott
    if ge is None:
        p = skin.loss_probability
        return p > 0.0 and random() < p
    if state.bad:
        if ge.r > 0.0 and random() < ge.r:
            state.bad = False
        loss = ge.loss_bad
    else:
        if ge.p > 0.0 and random() < ge.p:
            state.bad = True
        loss = ge.loss_good
    return loss > 0.0 and random() < loss
