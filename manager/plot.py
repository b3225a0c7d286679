"""A recorded run drawn over time: RTT, loss and throughput, with the skin's step changes marked.

A recording (``Recording``, saved as JSON) is what ``netskin demo --timeline`` measures: one RTT
probe result per send time (None = lost), throughput per interval at the receiver, and the times
at which the VM's timeline changed step. ``png`` draws it with matplotlib (Agg, no display);
``terminal_chart`` draws the same three rows in a terminal, one character per time bin.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

_BLOCKS = " ▁▂▃▄▅▆▇█"


@dataclass
class Recording:
    skin: str
    vm: str
    probes: list[tuple[float, float | None]] = field(default_factory=list)  # (t_s, rtt_ms or None)
    throughput: list[tuple[float, float]] = field(default_factory=list)  # (t_s at interval end, kbit/s)
    steps: list[tuple[float, int, str]] = field(default_factory=list)  # (t_s, step index, label)
    asked: dict = field(default_factory=dict)  # what the skin asks, for the title

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Recording:
        try:
            data = json.loads(Path(path).read_text())
            return cls(skin=data["skin"], vm=data["vm"],
                       probes=[(float(t), None if rtt is None else float(rtt)) for t, rtt in data["probes"]],
                       throughput=[(float(t), float(k)) for t, k in data.get("throughput", [])],
                       steps=[(float(t), int(i), str(label)) for t, i, label in data.get("steps", [])],
                       asked=data.get("asked", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a netskin recording ({exc})") from exc

    @property
    def duration_s(self) -> float:
        times = [t for t, _ in self.probes] + [t for t, _ in self.throughput]
        return max(times, default=0.0)

    def loss_series(self, bin_s: float = 0.5) -> list[tuple[float, float]]:
        """Round-trip loss (%) per ``bin_s`` of send time: (bin start, percent)."""
        bins: dict[int, list[int]] = {}
        for t, rtt in self.probes:
            sent_lost = bins.setdefault(int(t / bin_s), [0, 0])
            sent_lost[0] += 1
            sent_lost[1] += rtt is None
        return [(index * bin_s, 100 * lost / sent) for index, (sent, lost) in sorted(bins.items())]


def png(recording: Recording, path: Path) -> Path:
    """Draw the recording to a PNG at ``path``: RTT, loss and throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    rtt_axis, loss_axis, rate_axis = axes
    delivered = [(t, rtt) for t, rtt in recording.probes if rtt is not None]
    lost = [t for t, rtt in recording.probes if rtt is None]
    rtt_axis.plot([t for t, _ in delivered], [rtt for _, rtt in delivered], ".", markersize=2, color="tab:blue")
    if lost:
        top = max((rtt for _, rtt in delivered), default=1.0)
        rtt_axis.plot(lost, [top * 1.05] * len(lost), "|", color="tab:red", markersize=4, label="lost")
        rtt_axis.legend(loc="upper right")
    rtt_axis.set_ylabel("RTT (ms)")
    loss = recording.loss_series()
    loss_axis.step([t for t, _ in loss], [p for _, p in loss], where="post", color="tab:red")
    loss_axis.set_ylabel("loss (%)")
    loss_axis.set_ylim(-5, 105)
    rate_axis.step([t for t, _ in recording.throughput], [k / 1000 for _, k in recording.throughput],
                   where="pre", color="tab:green")
    rate_axis.set_ylabel("throughput (Mbit/s)")
    rate_axis.set_xlabel("time (s)")
    for t, index, label in recording.steps:
        for axis in axes:
            axis.axvline(t, color="grey", linestyle="--", linewidth=0.8)
        rtt_axis.annotate(label or f"step {index}", (t, 1), xycoords=("data", "axes fraction"),
                          rotation=90, va="top", ha="right", fontsize=7, color="grey")
    fig.suptitle(f"netskin: {recording.skin} on {recording.vm}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _sparkline(values: list[float | None], top: float) -> str:
    out = []
    for value in values:
        if value is None:
            out.append("·")
        elif top <= 0:
            out.append(_BLOCKS[0])
        else:
            out.append(_BLOCKS[min(len(_BLOCKS) - 1, max(0, round(value / top * (len(_BLOCKS) - 1))))])
    return "".join(out)


def _binned(points: list[tuple[float, float | None]], width: int, duration: float, *, mean_of_present=True
            ) -> list[float | None]:
    bins: list[list[float]] = [[] for _ in range(width)]
    for t, value in points:
        if value is not None:
            bins[min(width - 1, int(t / duration * width))].append(value)
    return [sum(b) / len(b) if b else None for b in bins]


def terminal_chart(recording: Recording, width: int = 72) -> str:
    """Three labelled rows (RTT, loss, throughput) and a row of step marks, ``width`` bins wide."""
    duration = max(recording.duration_s, 1e-9)
    rtt = _binned(recording.probes, width, duration)
    loss_bins: list[list[int]] = [[0, 0] for _ in range(width)]
    for t, value in recording.probes:
        cell = loss_bins[min(width - 1, int(t / duration * width))]
        cell[0] += 1
        cell[1] += value is None
    loss = [100 * lost / sent if sent else None for sent, lost in loss_bins]
    rate = _binned(recording.throughput, width, duration)
    for i in range(1, width):  # throughput is a step function: a column between samples keeps the last
        if rate[i] is None:
            rate[i] = rate[i - 1]
    marks = [" "] * width
    for t, index, _ in recording.steps:
        marks[min(width - 1, int(t / duration * width))] = "|"
    rtt_top = max((v for v in rtt if v is not None), default=0.0)
    rate_top = max((v for v in rate if v is not None), default=0.0)
    lines = [
        f"netskin: {recording.skin} on {recording.vm}, {duration:.1f} s",
        f"RTT   {_sparkline(rtt, rtt_top)}  max {rtt_top:.0f} ms",
        f"loss  {_sparkline(loss, 100.0)}  max {max((v for v in loss if v is not None), default=0):.0f} %",
        f"kbit  {_sparkline(rate, rate_top)}  max {rate_top:.0f} kbit/s",
        f"step  {''.join(marks)}",
    ]
    return "\n".join(lines)
