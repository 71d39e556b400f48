"""glibc allocator settings for CPU training: none, environment variables at start-up, or ``mallopt`` at run time.

    python benchmarks/malloc_tuning.py [--steps 6] [--size 224] [--repeats 3]

Each mode trains a ResNet-18-sized timm model (random weights, batch 32) for ``--steps`` SGD steps in a fresh
subprocess and reports images per second (median over ``--repeats``) and the process's minor page faults, which do
not depend on the machine's load. ``cil`` applies the ``mallopt`` mode (:mod:`cil._malloc`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch, timm
mode, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "mallopt":
    from cil._malloc import tune_malloc
    assert tune_malloc()
torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 3, size, size), torch.randint(0, 10, (32,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
step()  # warm-up
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for _ in range(steps):
    step()
elapsed = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"img_s": 32 * steps / elapsed, "faults_per_step": faults / steps}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    from cil._malloc import MALLOC_SETTINGS

    tuned_env = {name: str(value) for name, _, value in MALLOC_SETTINGS}
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    modes = {
        "glibc defaults": ("none", {**base, "CIL_NO_MALLOC_TUNING": "1"}),
        "MALLOC_* environment": ("none", {**base, **tuned_env}),
        "mallopt (cil)": ("mallopt", base),
    }
    print(f"| allocator | img/s (median of {options.repeats}) | minor page faults per step |")
    print("|---|---|---|")
    for label, (mode, env) in modes.items():
        runs = []
        for _ in range(options.repeats):
            command = [sys.executable, "-c", CHILD, mode, str(options.steps), str(options.size)]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
        speed = statistics.median(r["img_s"] for r in runs)
        faults = statistics.median(r["faults_per_step"] for r in runs)
        print(f"| {label} | {speed:.1f} | {faults:,.0f} |", flush=True)
    print(f"\nload average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
