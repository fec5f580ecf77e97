"""The ``long`` suite of ``distill eval``: its options, and its part of the report.

Two tasks measure what a constant-size state remembers: ``passkey`` (:mod:`.passkey`, an lm-eval
``generate_until`` task) and ``long_ppl`` (:mod:`.long_ppl`, loss by position, run by distill). Their
metrics are rows of the report's table like any task's; this module adds the views a table of
rows hides: the passkey accuracy per length x depth and the loss per position bucket with the
student/teacher ratio, as Markdown and as PNGs beside the report (``<stem>_passkey.png``,
``<stem>_long_ppl.png``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .long_ppl import TASK as LONG_PPL, LongPplOptions
from .passkey import PasskeyOptions, parse_cell

log = logging.getLogger(__name__)

PASSKEY = "passkey"
TASKS = (PASSKEY, LONG_PPL)
ROLES = ("teacher", "student")


@dataclass(frozen=True)
class LongContextOptions:
    """Settings of the ``long`` suite's two tasks."""

    passkey: PasskeyOptions = field(default_factory=PasskeyOptions)
    long_ppl: LongPplOptions = field(default_factory=LongPplOptions)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passkey"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["passkey"].items()}
        return out


def _metrics(results: dict[str, Any] | None, task: str) -> dict[str, float]:
    """``{metric: value}`` of ``task`` in lm-eval results (the ``none`` filter)."""
    entry = (results or {}).get("results", {}).get(task, {})
    return {k.partition(",")[0]: v for k, v in entry.items() if k.endswith(",none") and isinstance(v, (int, float))}


def section(results: dict[str, dict[str, Any] | None], options: LongContextOptions) -> dict[str, Any] | None:
    """The long-context numbers of each role (``teacher``, ``student``), None when no long task ran.

    ``passkey``: ``accuracy[role][i][j]`` at ``lengths[i]``, ``depths[j]`` (None where a model was not
    asked), ``by_length[role][i]``. ``long_ppl``: ``loss[role][b]`` per bucket, ``ratio[b]`` =
    student / teacher, ``tokens[b]`` (positions scored in the bucket, summed over windows).
    """
    out: dict[str, Any] = {}
    cells = {role: {parse_cell(m): v for m, v in _metrics(res, PASSKEY).items() if parse_cell(m)}
             for role, res in results.items() if res}
    if any(cells.values()):
        lengths = sorted({n for grid in cells.values() for n, _ in grid})
        depths = sorted({d for grid in cells.values() for _, d in grid})
        out[PASSKEY] = {
            "lengths": lengths, "depths": depths, "trials": options.passkey.trials,
            "accuracy": {role: [[grid.get((n, d)) for d in depths] for n in lengths] for role, grid in cells.items()},
            "by_length": {role: [_metrics(results[role], PASSKEY).get(f"acc_{n}") for n in lengths] for role in cells},
        }
    detail = {role: (res or {}).get(LONG_PPL) for role, res in results.items() if res and res.get(LONG_PPL)}
    if detail:
        names = list(dict.fromkeys(b["name"] for d in detail.values() for b in d["buckets"]))
        loss = {role: [next((b["loss"] for b in d["buckets"] if b["name"] == name), None) for name in names]
                for role, d in detail.items()}
        first = detail.get("student") or next(iter(detail.values()))
        tokens = {b["name"]: b["tokens"] for b in first["buckets"]}
        t, s = loss.get("teacher"), loss.get("student")
        out[LONG_PPL] = {
            "buckets": names, "tokens": [tokens.get(n) for n in names], "loss": loss,
            "ratio": [b / a if t and s and a and b is not None else None for a, b in zip(t or [], s or [])],
            "source": first["source"], "window_tokens": first["window_tokens"], "windows": first["windows"],
        }
    return out or None


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(long: dict[str, Any], images: dict[str, str]) -> str:
    """The long-context section of the report; ``images`` maps a task to its PNG's file name."""
    lines = ["", "## Long context", ""]
    if PASSKEY in long:
        pk = long[PASSKEY]
        roles = [r for r in ROLES if r in pk["accuracy"]]
        lines += [f"### passkey: exact match of the 5-digit key ({' / '.join(roles)})", "",
                  "| length \\ depth | " + " | ".join(f"{d:g}" for d in pk["depths"]) + " | all depths |",
                  "|---|" + "---:|" * (len(pk["depths"]) + 1)]
        for i, n in enumerate(pk["lengths"]):
            cells = [" / ".join(_num(pk["accuracy"][r][i][j]) for r in roles) for j in range(len(pk["depths"]))]
            lines.append(f"| {n} | " + " | ".join(cells) + " | " + " / ".join(_num(pk["by_length"][r][i]) for r in roles) + " |")
        lines += ["", f"Each cell: {pk['trials']} prompt(s), each with its own key; length in the model's tokens; "
                      "depth 0 = the key right after the instruction, 1 = right before the question.", ""]
        if PASSKEY in images:
            lines += [f"![passkey accuracy]({images[PASSKEY]})", ""]
    if LONG_PPL in long:
        lp = long[LONG_PPL]
        lines += [f"### long_ppl: next-token loss by position (nats/token; {len(lp['windows'])} window(s) of "
                  f"{lp['window_tokens']} tokens from {lp['source']})", "",
                  "| positions | tokens | teacher | student | student / teacher |", "|---|---:|---:|---:|---:|"]
        for b, name in enumerate(lp["buckets"]):
            t = lp["loss"].get("teacher", [None] * len(lp["buckets"]))[b]
            s = lp["loss"].get("student", [None] * len(lp["buckets"]))[b]
            ratio = lp["ratio"][b] if b < len(lp["ratio"]) else None
            lines.append(f"| {name} | {lp['tokens'][b] if lp['tokens'][b] is not None else '–'} | {_num(t, 3)} | "
                         f"{_num(s, 3)} | {_num(ratio, 3)} |")
        lines.append("")
        if LONG_PPL in images:
            lines += [f"![loss by position]({images[LONG_PPL]})", ""]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _passkey_figure(pk: dict[str, Any]):
    from matplotlib.figure import Figure

    roles = [r for r in ROLES if r in pk["accuracy"]]
    fig = Figure(figsize=(1.2 + 3.2 * len(roles), 2.1 + 0.45 * len(pk["lengths"])), layout="constrained")
    axes = fig.subplots(1, len(roles), squeeze=False)[0]
    for ax, role in zip(axes, roles):
        grid = [[float("nan") if v is None else v for v in row] for row in pk["accuracy"][role]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]])
        ax.set_yticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]])
        ax.set(xlabel="key depth", ylabel="prompt tokens", title=f"{role} passkey accuracy")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    return fig


def _long_ppl_figure(lp: dict[str, Any]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    loss_ax, ratio_ax = fig.subplots(1, 2)
    x = range(len(lp["buckets"]))
    for role in ROLES:
        if role in lp["loss"]:
            ys = [float("nan") if v is None else v for v in lp["loss"][role]]
            loss_ax.plot(x, ys, marker="o", label=role)
    loss_ax.set(xlabel="positions", ylabel="loss (nats/token)", title="next-token loss by position")
    loss_ax.set_xticks(list(x), lp["buckets"])
    loss_ax.legend()
    if any(r is not None for r in lp["ratio"]):
        ratio_ax.bar(list(x), [float("nan") if r is None else r for r in lp["ratio"]], color="tab:orange")
        ratio_ax.axhline(1.0, color="gray", linewidth=0.8)
    ratio_ax.set(xlabel="positions", ylabel="student / teacher", title="loss ratio")
    ratio_ax.set_xticks(list(x), lp["buckets"])
    return fig


FIGURES = {PASSKEY: _passkey_figure, LONG_PPL: _long_ppl_figure}


def write_plots(long: dict[str, Any], out: Path) -> dict[str, str]:
    """One PNG per long task beside ``out`` (``<stem>_<task>.png``); task -> file name."""
    names = {}
    for task, figure in FIGURES.items():
        if task in long:
            path = Path(out).with_name(f"{Path(out).stem}_{task}.png")
            _save(figure(long[task]), path)
            names[task] = path.name
    return names
