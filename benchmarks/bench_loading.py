"""How long ``tl_multimodal.load("offline")`` takes with a cold cache and then with a warm one, each in a new process,
on each backend (``--backend hooked``: HookedVisionPrefix, TransformerLens 3 only; ``bridge``: VisionBridge).

Each load runs in a fresh Python process (as a user's second session would), with the cache pointed
at a temporary folder (``$TL_MULTIMODAL_CACHE``) that starts empty. Printed: wall and CPU seconds of
the ``load`` call, of the imports, and of the whole process, cold and warm. On a busy shared
machine wall time mostly measures the wait for a core; CPU time is the work done.

    python benchmarks/bench_loading.py                    # one cold load, then --warm (default 3) warm loads
    python benchmarks/bench_loading.py --backend bridge   # the same for load("offline", backend="bridge")
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, time
w0, c0 = time.perf_counter(), time.process_time()
import timm, transformers, tl_multimodal.models.{module}  # torch, TransformerLens: counted as imports, not as the load
from tl_multimodal.pretrained.load import load
w1, c1 = time.perf_counter(), time.process_time()
model = load("offline", backend={backend!r})
w2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({{"imports": w1 - w0, "imports cpu": c1 - c0, "load": w2 - w1, "load cpu": c2 - c1}}))
"""


def _run(env: dict[str, str], backend: str) -> dict[str, float]:
    """One new process: its import and load times, plus the process's total wall time."""
    import resource
    import time

    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    child = _CHILD.format(module="prefix" if backend == "hooked" else "bridge", backend=backend)
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"load('offline', backend={backend!r}) failed in the child process:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["process cpu"] = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=3, help="warm-cache loads (median printed)")
    parser.add_argument("--backend", choices=("hooked", "bridge"), default="hooked",
                        help="the model class load builds (hooked needs TransformerLens 3)")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="tl_multimodal_cache_") as cache:
        env = {**os.environ, "TL_MULTIMODAL_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
        cold = _run(env, args.backend)
        warm = [_run(env, args.backend) for _ in range(args.warm)]
    med = {k: statistics.median(w[k] for w in warm) for k in cold}
    print(f"{'seconds':28}{'cold cache':>12}{'warm cache':>12}{'warm/cold':>10}   (warm: median of {args.warm})")
    for key in ("load", "imports", "process"):
        for kind in ("", " cpu"):
            label = {"load": f"load({args.backend})", "imports": "imports", "process": "whole new process"}[key]
            k = key + kind
            print(f"{label + (' CPU' if kind else ' wall'):28}{cold[k]:12.1f}{med[k]:12.1f}{med[k] / cold[k]:10.2f}")


if __name__ == "__main__":
    main()
