"""Loss stage: Bernoulli loss frequencies and Gilbert-Elliott long-run rate and burstiness."""

import math
from random import Random

import pytest

from interceptor.compiled import DirectionSkin, GilbertElliott
from interceptor.engine.loss import LossState, lose

Z_999 = 3.2905  # two-sided 99.9% normal quantile


def binomial_interval(n: int, p: float, z: float = Z_999) -> tuple[float, float]:
    """Where the observed loss rate of n Bernoulli(p) trials falls with 99.9% probability.

    Normal approximation of the binomial, p ± z·sqrt(p(1-p)/n), with the continuity
    correction 1/(2n) so that small n·p stays honest.
    """
    half = z * math.sqrt(p * (1 - p) / n) + 1 / (2 * n)
    return p - half, p + half


def run_losses(skin: DirectionSkin, n: int, seed: int) -> list[bool]:
    state = LossState()
    random = Random(seed).random
    return [lose(skin, state, random) for _ in range(n)]


@pytest.mark.parametrize("p", [0.001, 0.01, 0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_loss_frequency_is_inside_the_999_binomial_interval(p, seed):
    n = 20_000
    lost = sum(run_losses(DirectionSkin(loss_probability=p), n, seed))
    low, high = binomial_interval(n, p)
    assert low <= lost / n <= high, (lost / n, low, high)


def test_no_loss_and_certain_loss():
    assert not any(run_losses(DirectionSkin(loss_probability=0.0), 1000, 3))
    assert all(run_losses(DirectionSkin(loss_probability=1.0), 1000, 3))


def test_zero_loss_draws_no_random_number():
    def random():
        raise AssertionError("drew a random number for a lossless skin")

    assert lose(DirectionSkin(), LossState(), random) is False


def burst_lengths(losses: list[bool]) -> list[int]:
    bursts, run = [], 0
    for lost in losses:
        if lost:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    if run:
        bursts.append(run)
    return bursts


@pytest.mark.parametrize(
    "ge",
    [
        GilbertElliott(p=0.01, r=0.25),
        GilbertElliott(p=0.05, r=0.5),
        GilbertElliott(p=0.02, r=0.1, loss_bad=0.7, loss_good=0.01),
        GilbertElliott(p=0.1, r=0.3, loss_bad=0.9, loss_good=0.05),
    ],
)
def test_gilbert_elliott_long_run_rate_matches_the_stationary_formula(ge):
    n = 200_000
    losses = run_losses(DirectionSkin(gilbert_elliott=ge), n, 11)
    expected = ge.p / (ge.p + ge.r) * ge.loss_bad + ge.r / (ge.p + ge.r) * ge.loss_good
    # The chain is correlated, so a binomial interval is too tight; 10% relative is generous
    # enough to be deterministic-safe and tight enough to catch a wrong formula or ordering.
    assert abs(sum(losses) / n - expected) < 0.10 * expected


@pytest.mark.parametrize("p,r", [(0.01, 0.25), (0.02, 0.1), (0.05, 0.5)])
def test_gilbert_elliott_losses_come_in_bursts_of_mean_one_over_r(p, r):
    n = 200_000
    losses = run_losses(DirectionSkin(gilbert_elliott=GilbertElliott(p=p, r=r)), n, 5)
    bursts = burst_lengths(losses)
    mean_burst = sum(bursts) / len(bursts)
    assert abs(mean_burst - 1 / r) < 0.08 / r
    # Bernoulli loss at the same rate has mean burst 1/(1-rate) ≈ 1: GE is much burstier.
    rate = sum(losses) / n
    bernoulli = burst_lengths(run_losses(DirectionSkin(loss_probability=rate), n, 5))
    assert mean_burst > 1.5 * (sum(bernoulli) / len(bernoulli))


def test_gilbert_elliott_judges_a_packet_by_the_state_it_found():
    # netem order: the transition is drawn first, the loss uses the state before it.
    ge = GilbertElliott(p=1.0, r=1.0, loss_bad=1.0, loss_good=0.0)
    skin = DirectionSkin(gilbert_elliott=ge)
    state = LossState()
    random = Random(0).random
    # Good → (goes bad, judged good: kept), bad → (goes good, judged bad: lost), ...
    assert [lose(skin, state, random) for _ in range(6)] == [False, True] * 3


def test_gilbert_elliott_state_is_per_pipe_and_survives_a_skin_swap():
    ge = GilbertElliott(p=1.0, r=0.0)
    state = LossState()
    random = Random(0).random
    lose(DirectionSkin(gilbert_elliott=ge), state, random)
    assert state.bad
    other = DirectionSkin(gilbert_elliott=GilbertElliott(p=0.0, r=0.0))
    assert lose(other, state, random) is True  # still bad under the new parameters
