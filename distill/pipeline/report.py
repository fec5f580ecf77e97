"""``report.json``, ``report.md`` and PNG plots of a conversion run.

report.json keys: teacher_ppl, student_ppl, ppl_ratio, tokens (calibration tokens),
tokens_by_stage, seconds (per stage and total), layers (one entry per converted layer:
layer, fit_error, attn_kl, fit_error_init, attn_kl_init, transfer_mse_before,
transfer_mse_after — relative MSE, i.e. divided by the mean square of the teacher's output —
the absolute MSEs, and per-head fit metrics under ``heads``), events (NaN rollbacks),
finetune_ppl_curve (held-out perplexity against finetune tokens), teacher_mode (what the saved
model's ``distill_mode="teacher"`` computes: after a LoRA finetune the merged q/k/v/o are no longer
the teacher's), select (with ``select.keep_softmax``/``auto:K``: per-layer scores, the layers
kept as softmax and the memory they cost), model, config.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

log = logging.getLogger(__name__)

def merge_layers(converted: list[int], fit: list | None, transfer: list | None) -> list[dict]:
    """One row per converted layer from the stages' typed results (:class:`.fit.FitLayer`,
    :class:`.transfer.TransferLayer`); metrics of a skipped stage are None."""
    by_fit = {r.layer: r for r in fit or []}
    by_transfer = {r.layer: r for r in transfer or []}
    rows = []
    for i in converted:
        f, t = by_fit.get(i), by_transfer.get(i)
        rows.append(
            {
                "layer": i,
                "fit_error": f.fit_error if f else None,
                "attn_kl": f.attn_kl if f else None,
                "fit_error_init": f.fit_error_init if f else None,
                "attn_kl_init": f.attn_kl_init if f else None,
                "transfer_mse_before": t.transfer_mse_before if t else None,
                "transfer_mse_after": t.transfer_mse_after if t else None,
                "transfer_mse_before_abs": t.transfer_mse_before_abs if t else None,
                "transfer_mse_after_abs": t.transfer_mse_after_abs if t else None,
                "heads": f.heads if f else [],
            }
        )
    return rows


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _kwargs(kwargs: dict | None) -> str:
    return f" {kwargs}" if kwargs else ""


def markdown(report: dict) -> str:
    ratio = report.get("ppl_ratio")
    cfg = report["config"]["model"]
    lines = [
        "# distill convert report",
        "",
        f"Teacher: `{report['model']}`. Student: feature map `{cfg['feature_map']}`{_kwargs(cfg['feature_map_kwargs'])}, "
        f"recurrence `{cfg['recurrence']}`, window {cfg['window']}, depth {cfg['depth']}, decay {cfg['decay']}.",
        "",
        "| held-out perplexity | value |",
        "|---|---|",
        f"| teacher | {_fmt(report['teacher_ppl'], 3)} |",
        f"| student | {_fmt(report['student_ppl'], 3)} |",
        f"| student / teacher | {_fmt(ratio, 3)} |",
        "",
        f"Calibration tokens: {report['tokens']}; tokens processed per stage: "
        + ", ".join(f"{k} {v}" for k, v in report["tokens_by_stage"].items()),
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()),
        "",
        "## Per layer",
        "",
        "fit error: weighted relative RMS error of φ(q)·φ(k) against exp(s − m) (best per-head scale); "
        "attn KL: KL(teacher softmax ‖ student weights) in nats per query; both before (init) and after the fit. "
        "transfer MSE: relative MSE of the layer's output on held-out text, ‖o − o_teacher‖² / ‖o_teacher‖².",
        "",
        "| layer | fit error (init → fit) | attn KL (init → fit) | transfer MSE before → after |",
        "|---|---|---|---|",
    ]
    for r in report["layers"]:
        lines.append(
            f"| {r['layer']} | {_fmt(r['fit_error_init'])} → {_fmt(r['fit_error'])} | "
            f"{_fmt(r['attn_kl_init'])} → {_fmt(r['attn_kl'])} | "
            f"{_fmt(r['transfer_mse_before'])} → {_fmt(r['transfer_mse_after'])} |"
        )
    select = report.get("select")
    if select:
        mib = 2**20
        lines += [
            "",
            "## Layers kept as softmax (select)",
            "",
            f"Kept: {select['kept']} (the highest long-range loss increase when only that layer is converted). "
            f"Memory at {select['context']} tokens: recurrent state {select['state_bytes'] / mib:.2f} MiB + kept KV cache "
            f"{select['kept_kv_bytes'] / mib:.2f} MiB vs the teacher's KV cache {select['teacher_kv_bytes'] / mib:.2f} MiB.",
            "",
            "| layer | score (nats/token) |",
            "|---|---|",
        ]
        lines += [f"| {layer} | {score:.4f} |" for layer, score in sorted(select["scores"].items(), key=lambda kv: int(kv[0]))]
    if report.get("teacher_mode"):
        lines += ["", f"Teacher mode of the saved model: {report['teacher_mode']}"]
    if report.get("finetune_ppl_curve"):
        lines += ["", "## Held-out perplexity during finetune", "", "| step | tokens | perplexity |", "|---|---|---|"]
        lines += [f"| {p['step']} | {p['tokens']} | {p['ppl']:.3f} |" for p in report["finetune_ppl_curve"]]
    if report["events"]:
        lines += ["", "## Events", ""]
        lines += [f"- {e.get('stage', 'transfer')} layer {e.get('layer', '–')}: {e['message']} (hint: {e['hint']})" for e in report["events"]]
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in report.get("plots", [])), ""]
    return "\n".join(lines)


def plot(report: dict, curves: dict[str, Any], out: Path) -> list[str]:
    """Write PNG plots next to the report; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layers = report["layers"]
    xs = [r["layer"] for r in layers]
    if any(r["attn_kl"] is not None for r in layers):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, key, title in ((axes[0], "fit_error", "kernel fit error"), (axes[1], "attn_kl", "attention KL (nats)")):
            ax.plot(xs, [r[f"{key}_init"] for r in layers], "o--", label="default init")
            ax.plot(xs, [r[key] for r in layers], "o-", label="fitted")
            ax.set_xlabel("layer"), ax.set_title(title), ax.legend()
        fig.tight_layout(), fig.savefig(out / "fit.png", dpi=100), plt.close(fig)
        written.append("fit.png")
    if any(r["transfer_mse_after"] is not None for r in layers):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.semilogy(xs, [r["transfer_mse_before"] for r in layers], "o--", label="before transfer")
        ax.semilogy(xs, [r["transfer_mse_after"] for r in layers], "o-", label="after transfer")
        ax.set_xlabel("layer"), ax.set_ylabel("relative MSE (held-out)"), ax.legend()
        fig.tight_layout(), fig.savefig(out / "transfer.png", dpi=100), plt.close(fig)
        written.append("transfer.png")
    points = report.get("finetune_ppl_curve") or []
    if points:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p["tokens"] for p in points], [p["ppl"] for p in points], "o-", label="student")
        ax.axhline(report["teacher_ppl"], color="gray", ls="--", label="teacher")
        ax.set_xlabel("finetune tokens"), ax.set_ylabel("held-out perplexity"), ax.set_yscale("log"), ax.legend()
        fig.tight_layout(), fig.savefig(out / "ppl_curve.png", dpi=100), plt.close(fig)
        written.append("ppl_curve.png")
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, values in curves.items():
            if values:
                ax.plot(values, label=name, lw=1)
        ax.set_yscale("log"), ax.set_xlabel("step (subsampled for transfer)"), ax.set_ylabel("training loss")
        if len(curves) <= 10:
            ax.legend(fontsize=7)
        fig.tight_layout(), fig.savefig(out / "curves.png", dpi=100), plt.close(fig)
        written.append("curves.png")
    return written


def write_report(report: dict, curves: dict[str, Any], out: Path) -> None:
    out = Path(out)
    try:
        report["plots"] = plot(report, curves, out)
    except Exception as err:  # plots are a convenience; never fail a finished conversion over them
        log.warning("could not draw plots (%s)", err)
        report["plots"] = []
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", markdown(report))
