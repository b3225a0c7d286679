"""Engine workers without the kernel: what crosses to a worker process survives the trip, VMs are
spread over the workers, a shared uplink keeps every VM in one, and the host config's key."""

from __future__ import annotations

import os
import pickle
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from interceptor.engine.timeline import StepClock
from interceptor.library import SkinLibrary
from interceptor.profiles import load_profile, profile_dirs
from interceptor.schema import ConfigError, HostConfig, compile_document
from interceptor import shards as shards_module
from interceptor.shards import RemoteWorker, Shards, WorkerGone, _encode, _receive_blocking
from interceptor.timeline import compile_document_timeline


def compiled_presets():
    library = SkinLibrary(Path("/nonexistent"))
    for entry in library.entries():
        assert not entry.errors, entry.errors
        skin = compile_document(entry.document, entry.name, str(entry.path))
        if skin.security_profile:
            skin = replace(skin, firewall=load_profile(skin.security_profile, profile_dirs(None)))
        timeline = compile_document_timeline(entry.document, entry.name, skin, str(entry.path))
        yield replace(skin, timeline=timeline) if timeline else skin


def test_every_preset_crosses_to_a_worker_whole():
    """A worker gets compiled skins (with DNS rules, firewall profiles and timelines) as pickles."""
    skins = list(compiled_presets())
    assert len(skins) >= 20
    assert any(s.dns for s in skins) and any(s.firewall for s in skins) and any(s.timeline for s in skins)
    for skin in skins:
        copy = pickle.loads(pickle.dumps(skin, pickle.HIGHEST_PROTOCOL))
        assert copy == skin, skin.name


def test_a_timeline_clock_continues_where_it_was_in_the_copy():
    skin = next(s for s in compiled_presets() if s.timeline is not None)
    start = time.monotonic_ns() - 90 * 10**9
    clock = StepClock(skin.timeline, start, skin, seed=7)
    now = time.monotonic_ns()
    clock.advance(now)
    copy = pickle.loads(pickle.dumps(clock))
    later = now + 37 * 10**9
    assert copy.advance(later) == clock.advance(later)
    assert copy.position(later) == clock.position(later)


def test_frames_cross_a_socket_in_order():
    import socket
    a, b = socket.socketpair()
    with a, b:
        for obj in ((1, "ping", {}), (2, "set_indexes", {"indexes": {"tap0": 7}}), (3, "x", {"big": b"z" * 200_000})):
            a.sendall(_encode(obj))
        assert [_receive_blocking(b) for _ in range(3)][1] == (2, "set_indexes", {"indexes": {"tap0": 7}})


def _shards(workers: int, shared_uplink: bool = False, isolate: bool = False) -> Shards:
    config = HostConfig(workers=workers)
    return Shards(workers=workers, queue_numbers=config.queue_numbers, gso=True, shared_uplink=shared_uplink,
                  isolate=isolate, fail_open=True, host_uplink_kbps=1000 if shared_uplink else 0)


def in_trio(test):
    """Run the test in trio (the shell's timer closes through trio)."""
    def run():
        async def main():
            test()
        trio.run(main)
    run.__name__ = test.__name__
    return run


@in_trio
def test_vms_are_spread_over_the_workers_and_each_gets_its_workers_queues():
    shards = _shards(3)
    try:
        config = HostConfig(workers=3)
        for i in range(7):
            worker = shards.place(f"vm{i}")
            shards.add_vm(f"vm{i}", f"tap{i}", *config.queue_numbers(worker), worker=worker)
        counts = [list(shards.worker_of.values()).count(k) for k in range(3)]
        assert counts == [3, 2, 2]
        assert shards.queues["vm1"] == config.queue_numbers(1) == (7704, 7705)
        assert set(shards.paths) == {f"vm{i}" for i in range(7)}
        assert set(shards.local.paths) == {"vm0", "vm3", "vm6"}
        assert [w["vms"] for w in shards.workers_status()] == [3, 2, 2]
        shards.remove_vm("vm1")
        assert shards.place("vm9") == 1  # the worker with room again
    finally:
        shards.close()


@in_trio
def test_isolated_workers_are_all_child_processes_and_keep_their_queue_numbers():
    shards = _shards(2, isolate=True)
    try:
        config = HostConfig(workers=2)
        assert [remote.index for remote in shards.remotes] == [0, 1]
        for i in range(3):
            worker = shards.place(f"vm{i}")
            shards.add_vm(f"vm{i}", f"tap{i}", *config.queue_numbers(worker), worker=worker)
        assert [shards.worker_of[f"vm{i}"] for i in range(3)] == [0, 1, 0]
        assert shards.queues["vm0"] == config.queue_numbers(0) == (7700, 7701)
        assert not shards.local.paths  # the daemon's own shell holds no VM
        assert set(shards.remotes[0].paths) == {"vm0", "vm2"} and set(shards.remotes[1].paths) == {"vm1"}
        assert [(w["worker"], w["vms"]) for w in shards.workers_status()] == [(0, 2), (1, 1)]
        shards.remove_vm("vm2")
        assert set(shards.remotes[0].paths) == {"vm0"}
    finally:
        shards.close()


@in_trio
def test_a_shared_uplink_keeps_its_one_worker_in_the_daemons_process_even_isolated():
    shards = _shards(2, shared_uplink=True, isolate=True)
    try:
        assert not shards.isolated and not shards.remotes and shards.place("vm0") == 0
    finally:
        shards.close()


@pytest.mark.parametrize("isolate", [False, True])
def test_the_daemon_runs_a_data_path_thread_only_when_a_worker_lives_in_it(isolate):
    shards = _shards(1, isolate=isolate)
    shards.remotes = []  # no worker process started: only the daemon's own threads are looked at

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(shards.run)
            threads = [t for t in threading.enumerate() if t.name == "netskin-data"]
            assert len(threads) == (0 if isolate else 1)
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        shards.close()
    assert not [t for t in threading.enumerate() if t.name == "netskin-data"]


def test_the_data_path_is_isolated_by_default():
    assert HostConfig().isolate_data_path is True


@in_trio
def test_a_shared_uplink_keeps_every_vm_in_one_worker():
    shards = _shards(4, shared_uplink=True)
    try:
        assert shards.count == 1 and not shards.remotes
        assert {shards.place(f"vm{i}") for i in range(5)} == {0}
        assert shards.link is not None
    finally:
        shards.close()
    assert HostConfig(workers=4, host_uplink_kbps=1000).worker_count == 1


def test_workers_default_to_the_cores_the_daemon_may_use_but_one():
    assert HostConfig().worker_count == max(1, len(os.sched_getaffinity(0)) - 1)
    assert HostConfig(workers=3).worker_count == 3


def test_workers_out_of_range_or_without_room_for_their_queues_are_refused():
    with pytest.raises(ValueError, match="workers"):
        HostConfig(workers=65)
    with pytest.raises(ValueError, match=r"queue_base: 65500 .* 16 worker\(s\)"):
        HostConfig(workers=16, queue_base=65_500)


def test_a_worker_that_does_not_answer_is_killed_to_be_started_again(monkeypatch):
    """A call that times out means the worker's trio side is wedged: its process is killed, and
    the worker's ``serve`` (not run here) starts another with the same state."""
    monkeypatch.setattr(shards_module, "CALL_TIMEOUT_S", 0.2)
    worker = RemoteWorker(0, {}, 0, HostConfig().queue_numbers, True)
    worker.process = subprocess.Popen(["sleep", "60"])  # alive, never answers
    worker.alive = True
    try:
        async def main():
            with pytest.raises(WorkerGone, match="no answer to snapshot"):
                await worker.call("snapshot")
        trio.run(main)
        assert worker.process.wait(5) == -9
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@in_trio
def test_a_workers_snapshot_carries_only_the_vms_whose_counters_moved():
    box: list = []
    commands = shards_module._worker_commands(box, nursery=None)
    commands["init"](options={"fail_open": True}, nice=0, label="worker 0")
    try:
        for i in range(3):
            commands["add_vm"](name=f"vm{i}", interface=f"tap{i}", up=7700, down=7701, addresses=())
        assert set(commands["snapshot"]()["vms"]) == {"vm0", "vm1", "vm2"}  # the first: all of them
        assert commands["snapshot"]()["vms"] == {}  # idle since: none
        pipe = box[0].paths["vm1"].uplink
        pipe.hold(100)  # as the engine releases a held packet: counted, then its hold sampled
        pipe.released(100)
        pipe.hold_samples.append(5)
        report = commands["snapshot"]()["vms"]
        assert set(report) == {"vm1"} and report["vm1"]["samples_up"] == ([5], [])
        assert report["vm1"]["uplink"]["passed_packets"] == 1
        box[0].errors["vm2"] = 1  # a packet the shell failed on moves no pipe counter
        report = commands["snapshot"]()["vms"]
        assert set(report) == {"vm2"} and report["vm2"]["errors"] == 1
        commands["remove_vm"](name="vm1")
        commands["add_vm"](name="vm1", interface="tap1", up=7700, down=7701, addresses=())
        assert set(commands["snapshot"]()["vms"]) == {"vm1"}  # a VM added again is reported again
    finally:
        box[0].close()
