"""Link traces: find, read and compile ``uplink.trace`` / ``downlink.trace`` into the engine's form.

Two forms. A file of delivery opportunities in Mahimahi's format (one integer millisecond per
line, non-decreasing; every line is a chance to deliver 1500 bytes; the file repeats with the
last timestamp as its period), found beside the skin file or among the shipped traces in
``rules/traces``. Or a series ``{interval_ms, kbps: [...]}``: one rate per interval, repeating.
Both compile into one ``CompiledTrace`` (engine/trace.py). Files are read at validation and
compile time only, never by the engine; a file version is compiled once and shared (cached by
path, size and modification time), so recompiling a skin keeps the very same trace object.

Problems are ``TraceError``: one line naming the file or series and what is wrong with it.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from pathlib import Path

from interceptor.engine.trace import OPPORTUNITY_BYTES, CompiledTrace

NS_PER_MS = 1_000_000
MIN_INTERVAL_MS = 10  # the shell's timer is fine, but a rate per <10 ms says more than it can keep
MAX_OPPORTUNITIES = 10_000_000  # 80 MB of int64: hours of LTE, or a minute at 1.8 Gbit/s
MAX_FILE_BYTES = 128 << 20
_CACHE_SIZE = 32

_ALLOWED = b"0123456789 \t\r\n"


class TraceError(ValueError):
    """A trace the user named cannot be used; the message is one line."""


def shipped_traces_dir() -> Path:
    """``rules/traces`` as installed with netskin."""
    from interceptor.profiles import packaged_rules_dir  # profiles imports schema, which imports us

    return packaged_rules_dir() / "traces"


def resolve(name: str, base_dir: Path | None = None) -> Path:
    """The trace file ``name`` means: absolute as given; relative, beside the skin file
    (``base_dir``) first, then among the shipped traces."""
    path = Path(name).expanduser()
    if path.is_absolute():
        if path.is_file():
            return path
        raise TraceError(f"{name!r}: no such file")
    looked = [d for d in (base_dir, shipped_traces_dir()) if d is not None]
    for directory in looked:
        candidate = Path(directory) / path
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in looked)
    raise TraceError(f"{name!r}: no such trace file (looked in {where}); give a path or a shipped trace name")


_files: OrderedDict[tuple, CompiledTrace] = OrderedDict()
_series: OrderedDict[tuple, CompiledTrace] = OrderedDict()


def _remember(cache: OrderedDict, key: tuple, trace: CompiledTrace) -> CompiledTrace:
    cache[key] = trace
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return trace


def load_file(name: str, base_dir: Path | None = None) -> CompiledTrace:
    """The compiled trace of the Mahimahi file ``name`` (see ``resolve``)."""
    path = resolve(name, base_dir)
    try:
        st = path.stat()
    except OSError as exc:
        raise TraceError(f"{str(path)!r}: cannot read: {exc.strerror}") from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _files.get(key)
    if cached is not None:
        _files.move_to_end(key)
        return cached
    if st.st_size > MAX_FILE_BYTES:
        raise TraceError(f"{str(path)!r}: {st.st_size} bytes is too large (at most {MAX_FILE_BYTES})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"{str(path)!r}: cannot read: {exc.strerror}") from None
    return _remember(_files, key, parse_mahimahi(data, str(path)))


def parse_mahimahi(data: bytes, name: str) -> CompiledTrace:
    """Compile the text of a Mahimahi trace. Blank lines are skipped; anything else that is not
    a whole number of milliseconds is an error naming its line."""
    if data.translate(None, _ALLOWED):
        for number, line in enumerate(data.splitlines(), 1):
            text = line.strip()
            if text and not text.isdigit():
                shown = text[:40].decode("utf-8", "replace")
                raise TraceError(f"{name!r}: line {number}: {shown!r} is not a whole number of milliseconds")
    try:
        ms = array("q", map(int, data.split()))
    except OverflowError:
        raise TraceError(f"{name!r}: a timestamp is too large") from None
    if not ms:
        raise TraceError(f"{name!r}: the trace is empty (it needs one millisecond timestamp per line)")
    if len(ms) > MAX_OPPORTUNITIES:
        raise TraceError(f"{name!r}: {len(ms)} delivery opportunities is too many (at most {MAX_OPPORTUNITIES})")
    previous = ms[0]
    for index, value in enumerate(ms):
        if value < previous:
            number = _line_of(data, index)
            raise TraceError(
                f"{name!r}: line {number}: {value} is before the line above ({previous}); "
                f"timestamps must not decrease"
            )
        previous = value
    if ms[-1] == 0:
        raise TraceError(f"{name!r}: the last timestamp is 0; the trace must last a nonzero time (its period)")
    return CompiledTrace(
        name=name,
        times_ns=array("q", (t * NS_PER_MS for t in ms)),
        period_ns=ms[-1] * NS_PER_MS,
    )


def _line_of(data: bytes, index: int) -> int:
    """The line number of the index-th timestamp (blank lines do not count as timestamps)."""
    seen = -1
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            seen += 1
            if seen == index:
                return number
    return seen + 1


def compile_series(interval_ms: float, kbps: list[float] | tuple[float, ...]) -> CompiledTrace:
    """Delivery opportunities for a rate per interval, repeating every ``len(kbps)`` intervals.

    The opportunities fall where the link's cumulative capacity crosses each multiple of the
    opportunity size, so each interval delivers its rate to within one opportunity. The size is
    1500 bytes, shrunk just enough that a period holds a whole number of them (at most by 1 in
    1500 for low rates): the long-run rate of the series is then exact to the byte per period.
    """
    if interval_ms < MIN_INTERVAL_MS:
        raise TraceError(f"interval_ms: {interval_ms:g} is too short (allowed ≥ {MIN_INTERVAL_MS})")
    if not kbps:
        raise TraceError("kbps: the series is empty (give one rate per interval)")
    for index, rate in enumerate(kbps):
        if rate < 0 or not math.isfinite(rate):
            raise TraceError(f"kbps[{index}]: {rate:g} is not a rate (allowed ≥ 0)")
    key = (float(interval_ms), tuple(float(r) for r in kbps))
    cached = _series.get(key)
    if cached is not None:
        _series.move_to_end(key)
        return cached
    interval_ns = round(interval_ms * NS_PER_MS)
    # 1 kbit/s = 1000 bit/s = 125 bytes/s; per interval, in bytes.
    interval_bytes = [rate * 125 * interval_ns / 1e9 for rate in kbps]
    total = sum(interval_bytes)
    if total < 1:
        raise TraceError("kbps: every rate is 0, so the link never delivers (use packet_loss_percent 100 for an outage)")
    count = max(1, math.ceil(total / OPPORTUNITY_BYTES))
    if count > MAX_OPPORTUNITIES:
        raise TraceError(
            f"kbps: {count} delivery opportunities per period is too many (at most {MAX_OPPORTUNITIES}); "
            f"use fewer intervals or lower rates"
        )
    size = max(1, int(total // count))
    times = array("q")
    crossed = 0.0  # capacity reached at the start of the current interval, in bytes
    next_mark = size
    for index, (rate, capacity) in enumerate(zip(kbps, interval_bytes)):
        start_ns = index * interval_ns
        end = crossed + capacity
        while next_mark <= end + 1e-6 and len(times) < count:
            offset_ns = (next_mark - crossed) * interval_ns / capacity
            times.append(min(start_ns + round(offset_ns), start_ns + interval_ns))
            next_mark += size
        crossed = end
    if not times:  # pragma: no cover - total ≥ size guarantees one
        raise TraceError("kbps: the series delivers nothing")
    name = f"series of {len(kbps)} × {interval_ms:g} ms"
    trace = CompiledTrace(name=name, times_ns=times, period_ns=len(kbps) * interval_ns, opportunity_bytes=size)
    return _remember(_series, key, trace)
