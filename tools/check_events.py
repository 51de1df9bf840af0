#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with the `tensorboard` package's own reader and prints
every scalar series, to check that TensorBoard understands what `train` writes.

    /work/venv/bin/python tools/check_events.py output/demo/logs

Exits 1 when the folder has no event file or an expected tag is missing.
"""
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXPECTED = ["loss/current", "loss/average", "loss/epoch_average", "lr/unet", "norm/grad"]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    log_dir = Path(sys.argv[1])
    if not any(log_dir.glob("events.out.tfevents.*")):
        print(f"{log_dir}: no events.out.tfevents.* file", file=sys.stderr)
        return 1
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    missing = [t for t in EXPECTED if t not in tags["scalars"]]
    for tag in sorted(tags["scalars"]):
        events = acc.Scalars(tag)
        values = " ".join(f"{e.step}:{e.value:.4g}" for e in events[:3])
        last = events[-1]
        print(f"{tag:22} {len(events):4} points  first {values}  last {last.step}:{last.value:.4g}")
    for tag in sorted(tags["images"]):
        print(f"{tag:22} {len(acc.Images(tag)):4} images")
    if missing:
        print(f"missing tags: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
