"""Write the synthetic link traces shipped in rules/traces (Mahimahi format), deterministically.

    python scripts/make_traces.py            # (re)write rules/traces/*
    python scripts/make_traces.py --check    # exit 1 if a shipped file differs from what this writes

Each file is a list of delivery opportunities, one integer millisecond per line, non-decreasing:
at each one the link may deliver 1500 bytes. The file repeats with its last timestamp as the
period (as ``mm-link`` does), so the last line must fall at the very end of the cycle: a trace
that ends with an outage has to be rotated to start with it. A rate of R Mbit/s is R × 125 bytes
per millisecond; each millisecond adds that much credit and every 1500 bytes of credit is one
line at that millisecond, so every step delivers its rate exactly, with no randomness.

The files load unchanged in Mahimahi (``mm-link rules/traces/constant-12mbps ...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OPPORTUNITY_BYTES = 1500
TRACES_DIR = Path(__file__).resolve().parents[1] / "rules" / "traces"

# name -> steps of (seconds, Mbit/s), played in order, then repeated.
TRACES: dict[str, list[tuple[float, float]]] = {
    # A steady 12 Mbit/s: one opportunity every millisecond, a 1 s period.
    "constant-12mbps": [(1, 12)],
    # 1 s without delivery, then 1 s at 24 Mbit/s (two opportunities every millisecond), repeating.
    "onoff-24mbps-1s": [(1, 0), (1, 24)],
    # Walking away from the cell tower: the rate halves every 5 s down to 0.5 Mbit/s, 5 s out of
    # coverage, then back in range (3 Mbit/s for 2 s, 24 Mbit/s for 3 s). 40 s period.
    "walk-away-from-tower": [(5, 24), (5, 12), (5, 6), (5, 3), (5, 1.5), (5, 0.5), (5, 0), (2, 3), (3, 24)],
}


def opportunities(steps: list[tuple[float, float]]) -> list[int]:
    """The opportunity timestamps (ms) of one period of ``steps``."""
    times: list[int] = []
    credit = 0.0
    t_ms = 0
    for seconds, mbps in steps:
        for _ in range(round(seconds * 1000)):
            t_ms += 1
            credit += mbps * 125
            while credit >= OPPORTUNITY_BYTES - 1e-9:
                times.append(t_ms)
                credit -= OPPORTUNITY_BYTES
    if not times or times[-1] != t_ms:
        raise ValueError(f"the last step must deliver in its last millisecond (period {t_ms} ms), "
                         f"or the period would end early")
    return times


def render(steps: list[tuple[float, float]]) -> str:
    return "".join(f"{t}\n" for t in opportunities(steps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--dir", type=Path, default=TRACES_DIR, help="where the traces go (default rules/traces)")
    args = parser.parse_args(argv)
    stale = []
    for name, steps in TRACES.items():
        path = args.dir / name
        text = render(steps)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"{path}: {text.count(chr(10))} opportunities over {steps_seconds(steps):g} s")
    if stale:
        print("out of date (run python scripts/make_traces.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def steps_seconds(steps: list[tuple[float, float]]) -> float:
    return sum(seconds for seconds, _ in steps)


if __name__ == "__main__":
    sys.exit(main())
