"""How long ``tl-multimodal --help`` and an option error take, next to ``python -c pass``.

Each command runs in a new process (wall time, median of ``--repeats`` interleaved runs), so the
figures include the interpreter's start-up; the ratio to ``python -c pass`` shows what the CLI adds.

    python benchmarks/bench_cli.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each command")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "tl-multimodal --help": [sys.executable, "-m", "tl_multimodal", "--help"],
        "tl-multimodal caption --help": [sys.executable, "-m", "tl_multimodal", "caption", "--help"],
        "caption --max-new-tokens 0": [sys.executable, "-m", "tl_multimodal", "caption", "--max-new-tokens", "0"],
        "caption missing.png": [sys.executable, "-m", "tl_multimodal", "caption", "missing.png"],
    }

    def call(cmd):
        return lambda: subprocess.run(cmd, env=env, capture_output=True)

    times = interleaved({name: call(cmd) for name, cmd in commands.items()}, repeats=args.repeats, wall=True)
    base = times["python -c pass"]
    print(f"{'command (new process each)':32}{'wall s':>8}{'vs pass':>9}   (median of {args.repeats})")
    for name, t in times.items():
        print(f"{name:32}{t:8.3f}{t / base:9.2f}")


if __name__ == "__main__":
    main()
