"""A nanosecond timer for the data path's epoll: Linux timerfd through ctypes.

An epoll (or a trio sleep) times out in whole milliseconds, so a packet released on such a
timeout is up to 1 ms late. A timerfd armed at an absolute ``CLOCK_MONOTONIC`` time becomes
readable at that nanosecond and wakes the same epoll as the queues, so the delay line's error is
the scheduler's wake-up latency, not the millisecond grid. CLOCK_MONOTONIC is the clock behind
``time.monotonic_ns()``, which the shell passes to the engine."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
]


class TimerFd:
    """One-shot absolute timer; re-arming replaces the previous deadline."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self.armed_ns = 0  # 0 = disarmed
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)

    def arm(self, deadline_ns: int) -> None:
        """Fire at ``deadline_ns`` (monotonic). A deadline in the past fires at once."""
        if deadline_ns <= 0:
            deadline_ns = 1  # an all-zero it_value would disarm instead
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(deadline_ns, 1_000_000_000)
        if _libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, self._spec_ref, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.armed_ns = deadline_ns

    def disarm(self) -> None:
        value = self._spec.it_value
        value.tv_sec = value.tv_nsec = 0
        _libc.timerfd_settime(self.fd, 0, self._spec_ref, None)
        self.armed_ns = 0

    def expire(self) -> None:
        """Take the expiry that made the fd readable (none if it was re-armed since)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
