"""Start-up times of the `cil` command line; prints a markdown table.

    python benchmarks/startup.py [--run-dir DIR] [--repeats 3] [--no-quickstart]

Rows: `cil --help`; `cil summarize RUN_DIR` (a two-task run directory written here without training, or
``--run-dir``); `cil run --help`; and the time from launching `cil run --config configs/experiments/quickstart.yaml`
to its first batch. A callback (``FirstBatch`` below, passed as ``--trainer.callbacks``) prints a line at the first
training or prediction batch; the script stops the run there with SIGTERM. The quickstart's SimpleCIL trains no
step, so its first batch is the first feature extraction for its prototypes: everything before it (imports,
parsing, the pre-trained weights, the stream) is start-up.

Each command runs ``--repeats`` times as a fresh process (the `cil` console script of this interpreter); the table
gives the median wall time and the median CPU time (user + system of the process). On a loaded machine the wall time
grows with the load and the CPU time much less, so both are shown with the load average. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/experiments/quickstart.yaml"
MARKER = "startup.py: first batch"


def __getattr__(name: str) -> Any:
    """``startup.FirstBatch`` for the run's ``--trainer.callbacks``, built on first use so that the benchmark itself
    does not import Lightning."""
    if name != "FirstBatch":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _first_batch_class()


@functools.cache
def _first_batch_class() -> type:
    from lightning.pytorch.callbacks import Callback

    class FirstBatch(Callback):
        """Prints :data:`MARKER` to stderr at the first training or prediction batch of the run."""

        seen = False

        def _first(self) -> None:
            if not self.seen:
                self.seen = True
                print(MARKER, file=sys.stderr, flush=True)

        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            self._first()

        def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
            self._first()

    FirstBatch.__qualname__ = "FirstBatch"
    return FirstBatch


def _cil() -> list[str]:
    script = Path(sys.executable).parent / "cil"
    return [str(script)] if script.exists() else [shutil.which("cil") or "cil"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``command`` to its end."""
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    return wall, _children_cpu() - cpu


def _process_cpu(pid: int) -> float:
    """User + system seconds of a running process, all its threads (Linux: /proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _to_first_batch(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds from launching ``command`` to :data:`MARKER` on its stderr; the run is then stopped.

    The CPU time is the process's own at that moment (it keeps its pid through cil's malloc re-exec)."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            [*command, "--out", out], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        tail: list[str] = []
        for line in process.stderr:
            if line.strip() == MARKER:
                wall, cpu = time.perf_counter() - started, _process_cpu(process.pid)
                process.send_signal(signal.SIGTERM)
                process.communicate()
                return wall, cpu
            tail = [*tail[-20:], line]
        process.wait()
        raise RuntimeError(f"the run exited {process.returncode} before its first batch: {''.join(tail)}")


def tiny_run_dir(out: Path) -> Path:
    """A two-task run directory (results.csv, tasks.csv, summary.json) written without training."""
    import json

    import pandas as pd

    from cil.results import RESULT_COLUMNS, summarize

    base = {"method": "simplecil", "stream": "tiny", "seed": 1, "protocol": "class_incremental", "metric": "top1"}
    rows = [
        {**base, "train_task": i, "eval_task": j, "accuracy": acc, "n_correct": int(acc / 10), "n_test": 10}
        for i, j, acc in [(0, 0, 90.0), (1, 0, 70.0), (1, 1, 80.0)]
    ]
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    tasks = pd.DataFrame({"task": [0, 1], "fit_s": 1.0, "eval_s": 1.0, "wall_s": 2.0, "train_images": 10})
    tasks = tasks.assign(eval_images=10, trainable_params=0, total_params=5, train_flops=None)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    tasks.to_csv(out / "tasks.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summarize(results, tasks, 2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a run directory for `cil summarize` (default: a tiny one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-quickstart", action="store_true", help="skip the time to the quickstart's first batch")
    options = parser.parse_args()
    cil = _cil()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = options.run_dir or tiny_run_dir(Path(scratch) / "run")
        rows: list[tuple[str, Callable[[], tuple[float, float]]]] = [
            ("`cil --help`", lambda: _timed([*cil, "--help"])),
            ("`cil summarize RUN_DIR`", lambda: _timed([*cil, "summarize", str(run_dir)])),
            ("`cil run --help`", lambda: _timed([*cil, "run", "--help"])),
        ]
        if not options.no_quickstart:
            quickstart = [*cil, "run", "--config", str(QUICKSTART.relative_to(ROOT))]
            quickstart += ["--trainer.callbacks", "[{class_path: startup.FirstBatch}]"]
            rows.append(("quickstart `cil run` to its first batch", lambda: _to_first_batch(quickstart)))
        load = os.getloadavg()[0]
        print(f"{os.cpu_count()} CPUs, load average {load:.1f} at the start; median of {options.repeats} runs\n")
        print("| command | wall s | CPU s (user + sys) |")
        print("|---|---:|---:|")
        for name, measure in rows:
            times = [measure() for _ in range(options.repeats)]
            wall = statistics.median(t[0] for t in times)
            cpu = statistics.median(t[1] for t in times)
            print(f"| {name} | {wall:.2f} | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
