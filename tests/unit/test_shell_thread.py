"""The shell's data-path thread: held packets released by its timerfd, a failure raised out of
``run``, an unknown device reported to the trio loop, and nothing left running after a stop.
No kernel queues: the handlers are called as the thread would call them, under the lock."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from interceptor.schema import compile_document
from interceptor.shell import Shell
from tests.unit.test_shell_classify import FakePacket


def data_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "netskin-data"]


def a_shell(**options) -> Shell:
    shell = Shell(fail_open=True, batch_verdicts=False, **options)
    shell.add_vm("vm", "tap-a", 7700, 7701)
    shell.set_indexes({"tap-a": 7})
    return shell


def test_a_held_packet_is_released_by_the_data_path_thread_on_time():
    shell = a_shell()
    shell.set_skin("vm", compile_document({"uplink": {"delay_ms": 30}}, "slow"), 1)
    packet = FakePacket(indev=7)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(shell.run)
            assert len(data_threads()) == 1
            with shell.lock:  # as the thread holds it for a wake-up
                sent = time.monotonic()
                shell._handler(True)(packet)
                assert packet.verdict is None  # held
            with trio.fail_after(5):
                while packet.verdict is None:
                    await trio.sleep(0.001)
            released = time.monotonic()
            nursery.cancel_scope.cancel()
        return released - sent

    try:
        held_s = trio.run(main)
    finally:
        shell.close()
    assert packet.verdict == "accept"
    assert 0.029 <= held_s < 2.0  # never early; a slow machine may be late
    assert shell.held_packets == 0
    assert data_threads() == []  # joined when run was cancelled


def test_a_failure_in_the_data_path_ends_run_with_its_cause():
    shell = a_shell()

    def broken():
        raise ValueError("release broke")

    shell._release = broken  # the thread binds its handlers when it starts

    async def main():
        shell._timer.arm(1)  # due at once: the thread calls _release
        await shell.run()

    try:
        with pytest.raises(RuntimeError, match="data path stopped") as raised:
            trio.run(main)
    finally:
        shell.close()
    assert isinstance(raised.value.__cause__, ValueError)
    assert data_threads() == []


def test_an_unknown_device_on_the_data_path_asks_the_trio_loop_for_the_indexes():
    shell = a_shell()

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(shell.run)
            packets = [FakePacket(indev=99) for _ in range(50)]

            def on_the_data_path():  # another thread, as the data path is
                for packet in packets:
                    with shell.lock:
                        shell._handler(True)(packet)

            await trio.to_thread.run_sync(on_the_data_path)
            with trio.fail_after(5):
                await shell.indexes_wanted.wait()
            nursery.cancel_scope.cancel()
        return packets

    try:
        packets = trio.run(main)
    finally:
        shell.close()
    assert {packet.verdict for packet in packets} == {"accept"}  # fail_mode open
    assert shell.unclassified == 50
