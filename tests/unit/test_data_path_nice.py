"""The data path's thread gets its own niceness (threads it starts inherit it, others keep theirs)
and, if asked, its own scheduler slice."""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import threading

import pytest

from interceptor.daemon import set_data_path_nice
from interceptor.schema import ConfigError, load_host_config
from interceptor.shell import request_slice

SCHED_GETATTR = 315  # x86_64


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_only_the_calling_thread_and_its_children_change():
    seen: dict[str, int] = {}
    before = nice_of(threading.get_native_id())

    def data_path() -> None:
        set_data_path_nice(before + 5)  # raising niceness needs no privilege
        seen["data path"] = nice_of(threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(child=nice_of(threading.get_native_id())))
        child.start()
        child.join()

    thread = threading.Thread(target=data_path)
    thread.start()
    thread.join()
    assert seen == {"data path": before + 5, "child": before + 5}
    assert nice_of(threading.get_native_id()) == before  # the rest of the process is untouched


def test_zero_leaves_the_thread_alone():
    seen = {}

    def data_path() -> None:
        set_data_path_nice(0)
        seen["nice"] = nice_of(threading.get_native_id())

    thread = threading.Thread(target=data_path)
    thread.start()
    thread.join()
    assert seen["nice"] == nice_of(threading.get_native_id())


def slice_of(tid: int) -> int:
    """The thread's sched_attr.sched_runtime (its requested slice, ns), by sched_getattr."""
    attr = ctypes.create_string_buffer(56)
    assert ctypes.CDLL(None, use_errno=True).syscall(SCHED_GETATTR, tid, attr, 56, 0) == 0
    return struct.unpack("IIQiIQQQII", attr.raw)[5]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="sched_getattr's number is x86_64's here")
def test_the_slice_is_asked_for_the_calling_thread_only():
    seen = {}

    def data_path() -> None:
        seen["problem"] = request_slice(300_000)
        seen["slice"] = slice_of(threading.get_native_id())
        seen["nice"] = nice_of(threading.get_native_id())

    before = slice_of(threading.get_native_id())
    thread = threading.Thread(target=data_path)
    thread.start()
    thread.join()
    assert seen == {"problem": None, "slice": 300_000, "nice": nice_of(threading.get_native_id())}
    assert slice_of(threading.get_native_id()) == before


@pytest.mark.parametrize(("value", "ok"), [(0, True), (100, True), (100_000, True), (50, False),
                                           (100_001, False), (-1, False)])
def test_the_slice_setting_is_zero_or_in_the_kernels_range(tmp_path, value, ok):
    path = tmp_path / "interceptor.toml"
    path.write_text(f"data_path_slice_us = {value}\n")
    if ok:
        assert load_host_config(path).data_path_slice_us == value
    else:
        with pytest.raises(ConfigError, match="data_path_slice_us") as raised:
            load_host_config(path)
        assert str(value) in str(raised.value)
