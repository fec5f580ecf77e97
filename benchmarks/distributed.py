"""``distributed``: ``distill convert`` of the demo model in one process and over 2 ranks (torchrun,
gloo on CPU), in one benchmark run: seconds per stage for each, the speedup, how the ranks split
the work, and whether the two students agree.

Both runs use ``configs/demo-cpu.yaml`` (student-input transfer: every step's batch is split over
the ranks); ``--quick`` trains fewer steps per layer. A second, teacher-input pair shows the
layer-parallel split (each rank a block of layers), and a third run the student-input conversion
over 2 ranks with ``fsdp=true`` (each rank holds half of the teacher's weights), against the same
one-process run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .runner import Context, Result, case, save_figure

CONFIG = "configs/demo-cpu.yaml"
STAGES = ("load", "data", "teacher_eval", "fit", "transfer", "student_eval", "save")
VARIANTS = {  # name -> (folder, overrides on top of the demo config, ranks)
    "student inputs (data parallel)": ("student", [], (1, 2)),
    "teacher inputs (layer parallel)": ("teacher", ["transfer.inputs=teacher"], (1, 2)),
    "student inputs, fsdp=true (teacher sharded)": ("fsdp", ["fsdp=true"], (2,)),
}


def _convert(ranks: int, out: Path, overrides: list[str]) -> float:
    """Run one conversion; returns its whole-process wall seconds."""
    launcher = [sys.executable, "-m", "distill"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "distill"]
    cmd = [*launcher, "convert", "demo", "--config", CONFIG, "--out", str(out), "--overwrite", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


@case("distributed")
def distributed(ctx: Context) -> Result:
    steps = ["transfer.steps=20"] if ctx.quick else []
    steps.append("transfer.batch_size=2")  # a global batch that two ranks can split (the demo's is 1 x 2048)
    rows, notes, split = [], [], {}
    singles = {}  # folder -> the one-process row
    for variant, (folder, overrides, ranks_list) in VARIANTS.items():
        for ranks in ranks_list:
            out = ctx.out / "distributed" / f"{folder}-{ranks}"
            wall = _convert(ranks, out, [*overrides, *steps, "threads=1"])
            report = json.loads((out / "report.json").read_text())
            row = {"variant": variant, "ranks": ranks, "wall_s": wall}
            row |= {f"{s}_s": report["seconds"].get(s, 0.0) for s in STAGES}
            row |= {"student_ppl": report["student_ppl"], "ppl_ratio": report["ppl_ratio"]}
            row["weights_gib_per_rank"] = report.get("weights_gib_per_rank")
            rows.append(row)
            if ranks == 1:
                singles[folder] = row
            else:
                log = (out / "logs" / "rank0.log").read_text()
                found = re.search(r"layers per rank (\[.*\])", log)
                split[variant] = found.group(1) if found else "each layer over both ranks (batch split)"
        one, two = singles.get(folder, singles["student"]), rows[-1]
        shares = f"; weights per rank {', '.join(f'{g:.3f}' for g in two['weights_gib_per_rank'])} GiB" if two["weights_gib_per_rank"] else ""
        notes.append(
            f"{variant}: 2 ranks take {two['wall_s']:.0f} s vs {one['wall_s']:.0f} s in one process "
            f"({one['wall_s'] / two['wall_s']:.2f}x speedup, whole process); transfer "
            f"{one['transfer_s'] / max(two['transfer_s'], 1e-9):.2f}x; student ppl {two['student_ppl']:.4f} vs "
            f"{one['student_ppl']:.4f}; split: {split[variant]}{shares}."
        )
    notes.append(
        f"`distill convert demo --config {CONFIG} {' '.join(steps)} threads=1`, one process vs `torchrun --standalone "
        "--nproc-per-node 2 -m distill convert ...` (gloo), one torch thread per rank, both in this run."
    )

    def plot(out: Path) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        labels = [f"{r['variant'].split(' (')[0]}, {r['ranks']} rank(s)" for r in rows]
        left = [0.0] * len(rows)
        for stage in STAGES:
            values = [r[f"{stage}_s"] for r in rows]
            ax.barh(labels, values, left=left, label=stage)
            left = [a + b for a, b in zip(left, values)]
        ax.set(xlabel="seconds (report stages)", title="distill convert demo: 1 vs 2 ranks")
        ax.legend(fontsize=6, ncol=4)
        return save_figure(fig, out / "distributed.png")

    return Result(rows, notes=notes, plots=[plot], extra={"split": split})
