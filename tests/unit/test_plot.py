"""Drawing a recorded run (manager/plot.py): the recording file, the loss series, the PNG and the
terminal chart."""

from __future__ import annotations

import pytest

from manager.plot import Recording, png, terminal_chart


def sample() -> Recording:
    # 10 s: RTT 20 ms, an outage from 4 to 6 s (every probe lost, no throughput), steps at 0/4/6 s.
    probes = [(t / 10, None if 40 <= t < 60 else 20.0 + (t % 3)) for t in range(100)]
    throughput = [((i + 1) / 4, 0.0 if 16 <= i < 24 else 9600.0) for i in range(40)]
    steps = [(0.0, 1, "step 1"), (4.0, 2, "step 2"), (6.0, 1, "step 1")]
    return Recording(skin="flaky", vm="vm1", probes=probes, throughput=throughput, steps=steps)


def test_a_recording_survives_a_round_trip_through_its_file(tmp_path):
    path = tmp_path / "run.json"
    sample().save(path)
    again = Recording.load(path)
    assert again == sample()
    assert again.duration_s == 10.0


def test_a_file_that_is_not_a_recording_is_one_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"skin": 1}')
    with pytest.raises(ValueError, match="not a netskin recording"):
        Recording.load(path)


def test_loss_per_bin_shows_the_outage():
    loss = dict(sample().loss_series(bin_s=1.0))
    assert loss[3.0] == 0 and loss[4.0] == 100 and loss[5.0] == 100 and loss[6.0] == 0


def test_the_png_is_written(tmp_path):
    out = png(sample(), tmp_path / "run.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_the_terminal_chart_marks_the_outage_and_the_steps():
    chart = terminal_chart(sample(), width=50).splitlines()
    rtt, loss, rate, steps = chart[1], chart[2], chart[3], chart[4]
    assert rtt.startswith("RTT") and "·" in rtt  # no RTT while every probe was lost
    cells = loss[6:56]
    assert cells[:19].strip() == "" and "█" in cells[20:30]  # 4–6 s of 10 s: columns 20–29
    assert rate[6:56][22] == " "  # nothing delivered in the outage
    assert steps[6:56].count("|") == 3
