"""How long ``load_offline()`` takes with a cold cache and then with a warm one, each in a new process.

Each load runs in a fresh Python process (as a user's second session would), with the cache pointed
at a temporary folder (``$TL_MULTIMODAL_CACHE``) that starts empty. Printed: wall seconds of the
``load_offline()`` call and of the whole process (imports included), and their ratio.

    python benchmarks/bench_loading.py            # one cold load, then --warm (default 3) warm loads
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
t0 = time.perf_counter()
from tl_multimodal.loading import load_offline
t1 = time.perf_counter()
model = load_offline()
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1}))
"""


def _run(env: dict[str, str]) -> dict[str, float]:
    """One new process: its import and load times, plus the process's total wall time."""
    import time

    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=3, help="warm-cache loads (median printed)")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="tl_multimodal_cache_") as cache:
        env = {**os.environ, "TL_MULTIMODAL_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
        cold = _run(env)
        warm = [_run(env) for _ in range(args.warm)]
    med = {k: statistics.median(w[k] for w in warm) for k in cold}
    print(f"{'':24}{'cold cache':>12}{'warm cache':>12}{'ratio':>8}   (wall s; warm = median of {args.warm})")
    for key, label in [("load", "load_offline()"), ("imports", "imports"), ("process", "whole new process")]:
        print(f"{label:24}{cold[key]:12.1f}{med[key]:12.1f}{med[key] / cold[key]:8.2f}")


if __name__ == "__main__":
    main()
