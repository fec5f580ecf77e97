"""Case registry, timing, and result writing (JSON, Markdown, PNG)."""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill.files import atomic_write_text

log = logging.getLogger("benchmarks")


@dataclass
class Result:
    """One case's output: rows for the table/JSON, notes for people, and optional plots."""

    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    plots: list[Callable[[Path], Path]] = field(default_factory=list)  # each writes a PNG into DIR
    extra: dict[str, Any] = field(default_factory=dict)
    ran: str = ""  # when the case finished, and with how many torch threads (set by run())


CASES: dict[str, Callable[["Context"], Result]] = {}


def case(name: str):
    def wrap(fn):
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} registered twice")
        CASES[name] = fn
        return fn

    return wrap


@dataclass
class Context:
    out: Path
    quick: bool
    student_dir: str | None = None  # a converted folder; None = convert the demo model untrained
    threads: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table with one column per key seen in ``rows`` (in order of first appearance)."""
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: Path) -> Path:
    """Lay out, write ``path`` (PNG) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (anything else as its ``str``), atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _ran(info: dict[str, Any]) -> str:
    return f"{info['time']}, {info['torch_threads']} torch thread(s)"


def write_results(out: Path, info: dict[str, Any], results: dict[str, Result | str]) -> None:
    """Write DIR/results.json and DIR/results.md. Cases that an earlier run left in results.json and
    that did not run now are kept, so ``--cases a`` then ``--cases b`` add up; each case records
    when it ran and with how many torch threads."""
    out.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Any] = {}
    if (out / "results.json").exists():
        try:
            cases = json.loads((out / "results.json").read_text())["cases"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; writing it anew", out / "results.json")
    ran = _ran(info)
    for name, result in results.items():
        if isinstance(result, str):  # an error
            cases[name] = {"error": result, "ran": ran}
            continue
        pngs = []
        for plot in result.plots:
            try:
                pngs.append(plot(out).name)
            except Exception as err:  # a broken plot must not lose the numbers
                log.warning("plot for %s failed: %s", name, err)
        cases[name] = {"rows": result.rows, "notes": result.notes, "plots": pngs, "ran": result.ran or ran, **result.extra}
    md = [f"# Benchmarks\n\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"transformers {info['transformers']}, device {info['device']}.\n"]
    for name, case in cases.items():
        md.append(f"\n## {name}\n\nRun {case.get('ran', 'earlier')}.\n\n")
        if "error" in case:
            md.append(f"Failed: {case['error']}\n")
            continue
        md.append(markdown_table(case["rows"]))
        md += [f"\n- {note}" for note in case["notes"]]
        md += [f"\n\n![{png}]({png})" for png in case["plots"]]
        md.append("\n")
    write_json(out / "results.json", {"machine": info, "cases": cases})
    atomic_write_text(out / "results.md", "".join(md))


def run(names: list[str], ctx: Context) -> dict[str, Result | str]:
    results: dict[str, Result | str] = {}
    for name in names:
        log.info("case %s ...", name)
        start = time.perf_counter()
        try:
            results[name] = CASES[name](ctx)
        except Exception as err:  # one broken case must not lose the others' numbers
            if os.environ.get("BENCH_DEBUG"):
                raise
            log.exception("case %s failed", name)
            results[name] = f"{type(err).__name__}: {err}"
        log.info("case %s done in %.1f s", name, time.perf_counter() - start)
        info = machine()
        if isinstance(results[name], Result):
            results[name].ran = _ran(info)
        write_results(ctx.out, info, results)  # partial results survive a crash
    return results
