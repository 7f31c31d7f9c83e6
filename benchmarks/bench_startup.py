"""Start-up time of the command line and of `import anomalab`, beside `python -c "import torch"`.

Each command runs in a fresh process, the commands interleaved, `--repeats` times; the median wall-clock time
of each is printed with its ratio to importing torch alone. Targets (idle 2-core machine): `anomalab --help`
<= 0.5 s; `import anomalab` within 0.3 s of `import torch`.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (OMP_WAIT_POLICY=PASSIVE before anything starts)

PY = sys.executable
SCRIPT = shutil.which("anomalab", path=str(Path(PY).parent)) or ""
CLI = [SCRIPT] if SCRIPT else [PY, "-m", "anomalab.cli"]

COMMANDS: dict[str, list[str]] = {
    "python -c pass": [PY, "-c", "pass"],
    'python -c "import torch"': [PY, "-c", "import torch"],
    'python -c "import anomalab"': [PY, "-c", "import anomalab"],
    "import anomalab; anomalab.create('knn')": [PY, "-c", "import anomalab; anomalab.create('knn')"],
    "anomalab --help": [*CLI, "--help"],
    "anomalab list": [*CLI, "list"],
    "anomalab fit --help": [*CLI, "fit", "--help"],
}
TORCH = 'python -c "import torch"'


def run_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (median reported)")
    args = parser.parse_args(argv)
    for cmd in COMMANDS.values():  # warm the file cache once, untimed
        run_once(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(run_once(cmd))
    median = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"median of {args.repeats} fresh processes each, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}; CLI = {' '.join(CLI)}")
    print(f"{'command':44s} {'median s':>9s} {'min s':>7s} {'/ import torch':>15s}")
    for name in COMMANDS:
        print(f"{name:44s} {median[name]:9.3f} {min(times[name]):7.3f} {median[name] / median[TORCH]:15.2f}")
    extra = median['python -c "import anomalab"'] - median[TORCH]
    print(f"\nanomalab --help: {median['anomalab --help']:.3f} s (target <= 0.5 s: "
          f"{'met' if median['anomalab --help'] <= 0.5 else 'NOT met'})")
    print(f"import anomalab - import torch: {extra:+.3f} s (target <= 0.3 s: {'met' if extra <= 0.3 else 'NOT met'})")
    return median


if __name__ == "__main__":
    main()
