"""Wall time of `edgequant demo --quick` and `edgequant demo`, each a fresh process, run one after
the other, with the 1-minute load average before and after each (the machine is shared: a load
above 2 on its 2 cores means other jobs took part of the CPU). The FP32 model and the data set
are read from the user cache (the first run on a machine trains and generates them: about 10 s).
Each run gets an empty torch.compile cache (TORCHINDUCTOR_CACHE_DIR), so QAT's kernels are
compiled as on a fresh machine.

    flock /tmp/edgequant-bench.lock python benchmarks/demo_time.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import write_json  # benchmarks/_results.py (sys.path[0] here)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="quick,full")
    parser.add_argument("--out", default="benchmarks/results/demo_time.json")
    parser.add_argument("--work", default="/tmp/edgequant-demo-time")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    out: dict[str, Any] = {"commit": commit, "uncommitted_changes": dirty, "runs": {}}
    for mode in args.modes.split(","):
        folder = Path(args.work) / mode
        command = [sys.executable, "-m", "edgequant.cli", "demo", "--out", str(folder), "--quiet"]
        if mode == "quick":
            command.append("--quick")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as inductor:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor}
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row: dict[str, Any] = {
            "command": "edgequant demo --quiet" + (" --quick" if mode == "quick" else ""),
            "returncode": done.returncode,
            "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - wall)),
            "torch_compile_cache": "empty",
        }
        if done.returncode != 0:
            row["stderr_tail"] = done.stderr[-3000:]
        else:
            results = json.loads((folder / "results.json").read_text())
            row["results"] = results
        out["runs"][mode] = row
        print(mode, {k: v for k, v in row.items() if k != "results"}, flush=True)
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
