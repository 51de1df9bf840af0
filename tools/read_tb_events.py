#!/usr/bin/env python3
"""Read event files written by lora-trainer with TensorBoard's own code, and print what it sees.

This is the proof that TensorBoard itself reads our files (the Rust tests only use our own
reader). Three readers, all from the `tensorboard` PyPI package (pip install tensorboard):

1. records: TensorBoard's record reader (PyRecordReader_New, which checks both masked CRC-32Cs of
   every record) and its Event protobuf class; any damaged record is a hard error here, whereas
   TensorBoard's loaders silently stop at it.
2. accumulator: the EventAccumulator that `tensorboard --load_fast=false` serves from; it migrates
   our old-style `simple_value` / `image` values to the scalars and images plugins and applies
   SessionLog.START purges (a resumed run replacing an interrupted run's later points).
3. server (with --server): starts `tensorboard --logdir DIR --load_fast=true` (the Rust data
   server TensorBoard uses by default) and asks its HTTP API for the same scalars and images.

Usage:
    LORA_TRAINER_TB_DEMO_DIR=/tmp/tb-demo cargo test --test log_tensorboard
    /work/venv/bin/python tools/read_tb_events.py /tmp/tb-demo [--server]

Exits non-zero if any reader fails or the readers disagree. Not run in CI (it needs the
`tensorboard` package); see tools/README.md.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from tensorboard.backend.event_processing import io_wrapper
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
from tensorboard.util import tensor_util

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_dirs(logdir):
    """Each directory holding event files, as TensorBoard splits a logdir into runs."""
    runs = {}
    for root, _dirs, files in os.walk(logdir):
        events = sorted(f for f in files if io_wrapper.IsSummaryEventsFile(os.path.join(root, f)))
        if events:
            runs[os.path.relpath(root, logdir)] = [os.path.join(root, f) for f in events]
    return dict(sorted(runs.items()))


def read_records(path):
    """Every Event of one file, through TensorBoard's CRC-checking record reader."""
    reader = PyRecordReader_New(path.encode(), 0, b"", None)
    events = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return events
        # A DataLossError (bad CRC, truncated record) propagates: that is a failure here.
        events.append(event_pb2.Event.FromString(reader.record()))


def print_records(path):
    events = read_records(path)
    print(f"  file {os.path.basename(path)}: {len(events)} records, every CRC checked")
    for e in events:
        what = e.WhichOneof("what")
        if what == "file_version":
            print(f"    step {e.step:>4}  file_version {e.file_version!r}")
        elif what == "session_log":
            status = event_pb2.SessionLog.SessionStatus.Name(e.session_log.status)
            print(f"    step {e.step:>4}  session_log {status}")
        elif what == "summary":
            parts = []
            for v in e.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    parts.append(f"{v.tag}={v.simple_value:.6g}")
                elif kind == "image":
                    im = v.image
                    png = im.encoded_image_string.startswith(PNG_SIGNATURE)
                    parts.append(
                        f"{v.tag}=image {im.width}x{im.height} colorspace {im.colorspace}, "
                        f"{len(im.encoded_image_string)} bytes{' PNG' if png else ' NOT PNG'}"
                    )
                else:
                    parts.append(f"{v.tag}=<{kind}>")
            print(f"    step {e.step:>4}  " + "  ".join(parts))
        else:
            print(f"    step {e.step:>4}  <{what}>")
    return events


def accumulate(run_dir):
    """What TensorBoard's Python backend serves for one run: {plugin: {tag: [(step, value)]}}."""
    acc = pea.EventAccumulator(run_dir, size_guidance={pea.TENSORS: 0})
    acc.Reload()
    seen = {}
    for plugin in ("scalars", "images"):
        if plugin not in acc.ActivePlugins():
            continue
        for tag in sorted(acc.PluginTagToContent(plugin)):
            points = []
            for t in acc.Tensors(tag):
                value = tensor_util.make_ndarray(t.tensor_proto)
                if plugin == "scalars":
                    points.append((t.step, float(value)))
                else:
                    width, height, png = (bytes(x) for x in value.tolist())
                    points.append((t.step, (int(width), int(height), len(png), png[:8] == PNG_SIGNATURE)))
            seen.setdefault(plugin, {})[tag] = points
    return seen


def print_accumulated(seen):
    for plugin, tags in seen.items():
        for tag, points in tags.items():
            if plugin == "scalars":
                shown = ", ".join(f"{s}:{v:.6g}" for s, v in points)
            else:
                shown = ", ".join(
                    f"step {s}: {w}x{h} {n} bytes {'PNG' if ok else 'NOT PNG'}" for s, (w, h, n, ok) in points
                )
            print(f"    {plugin:<7} {tag:<22} {shown}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask_server(logdir, runs, expected):
    """Starts TensorBoard with its Rust data server and compares its scalars and images."""
    port = free_port()
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [tensorboard, "--logdir", logdir, "--port", str(port), "--host", "127.0.0.1",
           "--load_fast=true", "--reload_interval", "1"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def get(path, **query):
        url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.read()

    try:
        deadline = time.time() + 90
        while True:
            try:
                tags = json.loads(get("/data/plugin/scalars/tags"))
                want = {run: set(expected[run].get("scalars", {})) for run in runs}
                if all(want[r] <= set(tags.get(r, {})) for r in runs):
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                err = server.stderr.read().decode(errors="replace") if server.poll() is not None else ""
                raise SystemExit(f"TensorBoard server did not serve the runs in time\n{err}")
            time.sleep(1)
        failures = 0
        for run in runs:
            print(f"  run {run!r}:")
            for tag, points in expected[run].get("scalars", {}).items():
                served = json.loads(get("/data/plugin/scalars/scalars", run=run, tag=tag))
                pairs = [(step, value) for _wall, step, value in served]
                same = [s for s, _ in pairs] == [s for s, _ in points] and all(
                    abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(pairs, points)
                )
                failures += not same
                print(f"    scalars {tag:<22} {len(pairs)} points {'== accumulator' if same else '!= accumulator'}")
            for tag, points in expected[run].get("images", {}).items():
                served = json.loads(get("/data/plugin/images/images", run=run, tag=tag, sample=0))
                for entry, (step, (_w, _h, size, _ok)) in zip(served, points):
                    png = get("/data/plugin/images/individualImage" + "", **dict(urllib.parse.parse_qsl(entry["query"])))
                    same = entry["step"] == step and len(png) == size and png.startswith(PNG_SIGNATURE)
                    failures += not same
                    print(f"    images  {tag:<22} step {entry['step']}: {len(png)} PNG bytes "
                          f"{'== accumulator' if same else '!= accumulator'}")
                failures += len(served) != len(points)
        return failures
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("--server", action="store_true", help="also ask a TensorBoard server (Rust data server)")
    args = parser.parse_args()

    runs = run_dirs(args.logdir)
    if not runs:
        raise SystemExit(f"{args.logdir}: no event files (events.out.tfevents.*) found")
    expected = {}
    for run, files in runs.items():
        print(f"run {run!r}")
        print(" records (TensorBoard's record reader + Event proto):")
        for path in files:
            print_records(path)
        print(" accumulator (what TensorBoard's Python backend shows):")
        expected[run] = accumulate(os.path.join(args.logdir, run))
        print_accumulated(expected[run])
    if args.server:
        print("server (tensorboard --load_fast=true, HTTP API):")
        failures = ask_server(args.logdir, list(runs), expected)
        if failures:
            raise SystemExit(f"{failures} difference(s) between the server and the accumulator")
    print("OK: TensorBoard read every file")


if __name__ == "__main__":
    main()
