"""A packet's time is the kernel's stamp (its NFQA_TIMESTAMP: an uplink packet's arrival at the
host), not when the data path read it: a delay is counted from the arrival, and an unusable
stamp falls back to the read time."""

from __future__ import annotations

import time

import pytest

from interceptor.schema import compile_document
from interceptor.shell import STAMP_MAX_AGE_NS, Shell
from tests.unit.test_shell_classify import FakePacket

DELAY_NS = 30_000_000


class StampedPacket(FakePacket):
    def __init__(self, stamp_s: float, **kw) -> None:
        super().__init__(**kw)
        self.stamp_s = stamp_s

    def get_timestamp(self) -> float:
        return self.stamp_s  # wall-clock seconds, as netfilterqueue reports the kernel's stamp


@pytest.fixture
def shell():
    s = Shell(fail_open=True, batch_verdicts=False)
    s.add_vm("vm", "tap-a", 7700, 7701)
    s.set_indexes({"tap-a": 7})
    s.set_skin("vm", compile_document({"uplink": {"delay_ms": DELAY_NS / 1e6}}, "slow"), 1)
    yield s
    s.close()


def due_after_read_ns(shell: Shell, stamp_s: float) -> int:
    """How long after the handler read the packet its release is due."""
    packet = StampedPacket(stamp_s, indev=7)
    read = time.monotonic_ns()
    shell._handler(True)(packet)
    assert packet.verdict is None  # held
    return shell.engine.next_due_ns - read


def test_a_packet_read_late_is_held_only_for_what_is_left_of_its_delay(shell):
    left = due_after_read_ns(shell, time.time() - 0.010)  # queued 10 ms before it was read
    assert DELAY_NS - 10_500_000 <= left <= DELAY_NS - 9_000_000


def test_a_packet_read_after_its_delay_is_due_at_once(shell):
    assert due_after_read_ns(shell, time.time() - 0.040) < 0  # the release timer fires at once


@pytest.mark.parametrize("stamp", [
    pytest.param(lambda: 0.0, id="no stamp"),
    pytest.param(lambda: time.time() + 5, id="from the future"),  # the wall clock was stepped back
    pytest.param(lambda: time.time() - 2 * STAMP_MAX_AGE_NS / 1e9, id="too old"),  # stepped forward
])
def test_an_unusable_stamp_counts_the_delay_from_the_read(shell, stamp):
    assert DELAY_NS - 500_000 <= due_after_read_ns(shell, stamp()) <= DELAY_NS + 2_000_000
