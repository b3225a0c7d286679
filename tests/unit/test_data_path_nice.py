"""The data path's thread gets its own niceness; threads it starts inherit it, others keep theirs."""

from __future__ import annotations

import os
import threading

from interceptor.daemon import set_data_path_nice


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
