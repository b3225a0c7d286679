"""The benchmark's final table as Markdown (bench/run.py summary_text), as pasted in the README."""

from __future__ import annotations

from bench.run import Results, summary_text


def test_a_pipe_inside_a_cell_does_not_split_it():
    results = Results(plan={})
    results.summary = [
        {"metric": "added-delay error p50", "measured": "+0.029 ms", "goal": "|p50| ≤ 0.2 ms", "met": True},
        {"metric": "ramp tracking", "measured": "median |residual| 0.46 ms", "goal": "median ≤ 5 ms", "met": False},
        {"metric": "context", "measured": "83 %", "goal": "—", "met": None},
    ]
    lines = summary_text(results).splitlines()
    rows = [line for line in lines if not set(line) <= set("|-: ")]
    # Every row has the header's four cells: count the pipes that are not escaped.
    cells = [line.replace("\\|", "").count("|") - 1 for line in rows]
    assert cells == [4, 4, 4, 4], lines
    assert "\\|p50\\|" in lines[2] and "**no**" in lines[3] and lines[4].split("|")[4].strip() == "—"
