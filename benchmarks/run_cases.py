"""Conversion cost, quality and long-context memory of a finished ``distill convert`` run (default ``runs/demo``).

``conversion`` and ``quality`` read what the run wrote (report.json, and eval.json from
``distill eval`` when present). Before reporting quality, the saved student is reloaded and its
held-out perplexity recomputed on the run's own held-out windows: it must equal the figure in the
report. ``long_context`` runs ``distill eval --tasks long`` (passkey retrieval and loss by position)
on the run's student and its teacher, after checking that every passkey prompt has its length and
holds its key at its depth.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from .runner import Context, Result, case, save_figure

DEFAULT_RUN = Path("runs/demo")
STAGES = ("load", "data", "teacher_eval", "fit", "transfer", "finetune", "student_eval", "save")


def _run_dir(ctx: Context) -> Path:
    run = Path(ctx.student_dir) if ctx.student_dir else DEFAULT_RUN
    if not (run / "report.json").is_file():
        raise FileNotFoundError(f"{run}/report.json not found; run `make demo` first or pass --student RUN_DIR")
    return run


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


@case("conversion")
def conversion(ctx: Context) -> Result:
    run = _run_dir(ctx)
    rep = _report(run)
    seconds = rep["seconds"]
    tokens = rep.get("tokens_by_stage", {}) | {"teacher_eval": rep["heldout_tokens"], "student_eval": rep["heldout_tokens"]}
    rows = []
    for stage in STAGES:
        if stage not in seconds:
            continue
        sec, tok = seconds[stage], tokens.get(stage)
        rows.append({"stage": stage, "seconds": sec, "tokens": tok if tok is not None else "",
                     "tokens_per_s": tok / sec if tok and sec else ""})
    rows.append({"stage": "total", "seconds": seconds["total"], "tokens": "", "tokens_per_s": ""})

    def plot(out: Path) -> Path:
        import matplotlib.pyplot as plt

        stages = [r for r in rows if r["stage"] != "total"]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh([r["stage"] for r in stages][::-1], [r["seconds"] for r in stages][::-1])
        ax.set(xlabel="seconds", title=f"conversion cost ({run.name}, {seconds['total']:.0f} s)")
        return save_figure(fig, out / "conversion.png")

    return Result(
        rows,
        notes=[
            f"From {run}/report.json (`distill convert`, config in {run}/run.yaml). Tokens are those each stage "
            "processed: fit = calibration tokens whose q/k it fitted on; transfer = tokens through one layer, "
            "summed over layers and steps; finetune = tokens through the whole model; *_eval = held-out tokens.",
            "Wall seconds are as measured during that run, on whatever else the machine was doing.",
        ],
        plots=[plot],
    )


@case("quality")
def quality(ctx: Context) -> Result:
    from distill import load_converted
    from distill.models import load_model
    from distill.pipeline.run_config import RunConfig
    from distill.pipeline.data import prepare_data
    from distill.pipeline.perplexity import perplexity

    run = _run_dir(ctx)
    rep = _report(run)
    cfg = RunConfig.from_dict(yaml.safe_load((run / "run.yaml").read_text()))
    student = load_converted(run).eval()
    _, tokenizer = load_model(rep["model"])
    data = prepare_data(cfg, student, tokenizer)  # the run's held-out windows (deterministic split)
    ppl = perplexity(student, data.heldout, "parallel", cfg.batch_size_eval)
    if not math.isclose(ppl, rep["student_ppl"], rel_tol=1e-4):  # correctness first: the saved model is the measured one
        raise AssertionError(f"reloaded student perplexity {ppl:.4f} != report's {rep['student_ppl']:.4f}")
    rows = [{"task": "held-out perplexity", "metric": f"ppl ({rep['heldout_tokens']} tokens)",
             "teacher": rep["teacher_ppl"], "student": ppl, "recovery_%": 100 * rep["teacher_ppl"] / ppl, "relative_%": ""}]
    notes = [f"Held-out perplexity recomputed from the saved student in {run} (equals the report's); teacher from the report."]
    eval_path = run / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        for r in ev["rows"]:
            rows.append({"task": r["task"], "metric": r["metric"], "teacher": r["teacher"], "student": r["student"],
                         "recovery_%": r["recovery"] if r["recovery"] is not None else "",
                         "relative_%": r["relative"] if r["relative"] is not None else ""})
        notes.append(f"Offline lm-eval suite from {eval_path}: {ev['summary']}")
    else:
        notes.append(f"No {eval_path}: run `distill eval {run} --teacher {rep['model']} --tasks offline --out {eval_path}`.")
    return Result(rows, notes=notes)


# What the long_context case asks, quick / full: CPU-sized; the whole suite (to 8k tokens, 5 trials)
# is `distill eval RUN --teacher MODEL --tasks long`.
LONG_SIZES = {
    True: {"lengths": (512, 1024), "trials": 1, "tokens": 1024, "docs": 2},
    False: {"lengths": (512, 1024, 2048, 4096), "trials": 2, "tokens": 4096, "docs": 4},
}


@case("long_context")
def long_context(ctx: Context) -> Result:
    from distill.eval import passkey, runner
    from distill.eval.long_context import LongContextOptions
    from distill.eval.long_ppl import LongPplOptions

    run = _run_dir(ctx)
    rep = _report(run)
    size = LONG_SIZES[ctx.quick]
    options = LongContextOptions(passkey.PasskeyOptions(lengths=size["lengths"], trials=size["trials"]),
                                 LongPplOptions(tokens=size["tokens"], docs=size["docs"]))
    # correctness first: every prompt has its length (within 5 tokens) and holds its key once, at its depth
    tokenizer, positions = passkey.prompt_tokenizer(str(run))
    for doc in passkey.build_docs(tokenizer, options.passkey, positions):
        needle = " " + passkey.NEEDLE.format(key=doc["key"])
        if (abs(doc["n_tokens"] - doc["length"]) > 5 or doc["prompt"].count(needle) != 1
                or abs(doc["needle_depth"] - doc["depth"]) > 0.05):
            raise AssertionError(f"passkey prompt of {doc['n_tokens']} tokens (asked {doc['length']}), key depth "
                                 f"{doc['needle_depth']:.3f} (asked {doc['depth']}), needle count {doc['prompt'].count(needle)}")
    report = runner.run({"student": str(run), "teacher": rep["model"]}, "long", long_context=options)
    out = ctx.out / "long_context.json"
    runner.write_report(report, out)

    long = report["long_context"]
    pk, lp = long["passkey"], long["long_ppl"]
    rows = []
    for i, n in enumerate(pk["lengths"]):
        t, s = pk["by_length"]["teacher"][i], pk["by_length"]["student"][i]
        rows.append({"task": "passkey", "cell": f"{n} tokens", "metric": f"accuracy ({len(pk['depths']) * pk['trials']} prompts)",
                     "teacher": t, "student": s, "student / teacher": s / t if t else ""})
    for b, name in enumerate(lp["buckets"]):
        rows.append({"task": "long_ppl", "cell": f"positions {name}", "metric": f"loss, nats/token ({lp['tokens'][b]} tokens)",
                     "teacher": lp["loss"]["teacher"][b], "student": lp["loss"]["student"][b],
                     "student / teacher": lp["ratio"][b] if lp["ratio"][b] is not None else ""})
    lengths = ",".join(str(n) for n in size["lengths"])
    notes = [
        f"`distill eval {run} --teacher {rep['model']} --tasks long --passkey-lengths {lengths} --passkey-trials "
        f"{size['trials']} --long-ppl-tokens {size['tokens']} --long-ppl-docs {size['docs']} --out {out}`, float32; "
        f"full report with the length x depth grid in {out.with_suffix('.md')}.",
        f"passkey: a 5-digit key at depths {', '.join(f'{d:g}' for d in pk['depths'])} of filler text, answered by greedy "
        "generation through each model's cache (the student's recurrent state, the teacher's KV cache); exact match.",
        f"long_ppl: {len(lp['windows'])} window(s) of {lp['window_tokens']} tokens from {lp['source']}; loss per "
        "position bucket, each window scored from its first token.",
        report["summary"],
    ]
    return Result(rows, notes=notes, plots=[lambda out_dir, name=name: out_dir / name for name in report.get("plots", [])],
                  extra={"passkey_grid": pk})
