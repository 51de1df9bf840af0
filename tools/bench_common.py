"""What the reference sides of `bench` share (tools/bench_diffusers.py, tools/bench_transformers.py):
timing the steps, the process's peak memory, and the JSON line the bench binary reads."""

import json
import resource
import statistics
import sys
import time


def peak_rss():
    """This process's peak resident memory in bytes: `VmHWM`, which starts afresh at exec (the
    `ru_maxrss` of a child inherits its parent's peak: the bench's own, when it starts us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_steps(step, warmup, steps, synchronize=None):
    """Runs `step()` (returning the loss tensor) `warmup + steps` times; the seconds of the last
    `steps` and the last loss."""
    times, loss = [], None
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step()
        if synchronize is not None:
            synchronize()
        elapsed = time.perf_counter() - start
        print(f"step {i}: {elapsed:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
        if i >= warmup:
            times.append(elapsed)
    return times, loss


def report(times, loss, n_params, versions, peak_device_bytes=None):
    """The JSON line the bench binary reads (printed last on stdout)."""
    print(json.dumps({
        "step_seconds": times,
        "min_seconds": min(times),
        "median_seconds": statistics.median(times),
        "peak_rss_bytes": peak_rss(),
        "peak_device_bytes": peak_device_bytes,
        "lora_parameters": n_params,
        "last_loss": float(loss.item()),
        "versions": versions,
    }))
