"""Research ablations on the demo model at one fixed small budget (configs/ablations.yaml).

Questions: does polynomial feature fitting start better than Taylor or random? do stacked
linear-RNN layers beat one? does output-MSE transfer work, and does the attention-weight loss add
anything? Each variant: convert a copy of the teacher, initialise, measure (budget 0), transfer
layer by layer, measure again. The teacher, its data and its perplexity are computed once.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from distill import convert_model
from distill.models import load_model
from distill.pipeline.checkpoint import RunStore
from distill.pipeline.run_config import RunConfig
from distill.pipeline.data import prepare_data
from distill.pipeline.perplexity import perplexity
from distill.pipeline.fit import collect_qk, make_pairs, run_fit, set_mix
from distill.pipeline.params import converted_layers
from distill.pipeline.train import StageContext, prepare_new_parameters
from distill.pipeline.layerwise import decoder_layers
from distill.pipeline.transfer import run_transfer

from .runner import Context, Result, case, save_figure

log = logging.getLogger("benchmarks.ablations")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ablations.yaml"


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@torch.no_grad()
def _random_projection(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in converted_layers(model):
        fm = decoder_layers(model)[i].self_attn.rnn.feature_map
        q, _ = torch.linalg.qr(torch.randn(fm.proj.shape[0], fm.proj.shape[1], fm.proj.shape[2], generator=g, dtype=torch.float64))
        fm.proj.copy_(q.to(fm.proj.dtype))  # (Hk, D, r) orthonormal columns


@torch.no_grad()
def _set_mixing(model, ids, cfg: RunConfig) -> None:
    """The fit stage's per-head scale of the linear part (window > 0), without fitting φ."""
    layers = converted_layers(model)
    for i, q, k, features in collect_qk(model, ids[: cfg.fit.sequences], layers, batch=cfg.fit.sequences):
        layer = decoder_layers(model)[i].self_attn
        set_mix(layer, make_pairs(layer, q, k, cfg.fit, features))


def _state_bytes(model) -> int:
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(3, 1000, (1, 80)), cache=cache, use_cache=True)
    return cache.nbytes()


def _initialise(model, data, cfg: RunConfig, init: str, ctx: StageContext) -> dict:
    """Apply ``init`` to a freshly converted model; returns its fit errors (poly-fit only)."""
    torch.manual_seed(ctx.seed)
    if init == "random":
        _random_projection(model, ctx.seed)
    if init == "poly-fit":
        fit = run_fit(model, data, cfg.fit, ctx)
        return {"fit_error": statistics.mean(r.fit_error for r in fit)}
    if cfg.model.window:
        _set_mixing(model, data.train, cfg)
    return {}


def _variant(teacher, data, cfg: RunConfig, init: str, seed: int, quiet, starts: dict) -> dict:
    """Convert, initialise, transfer, measure. ``starts`` memoises the initialised sublayer-1
    parameters and budget-0 perplexity per (init, window): a deeper stack starts exactly equal to
    depth 1 (zero-initialised residual sublayers) and the loss only matters once training starts."""
    model = convert_model(copy.deepcopy(teacher), cfg.model)
    prepare_new_parameters(model)
    start = time.time()
    key = (init, cfg.model.window)
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp))
        store.create({})
        ctx = StageContext(seed=seed, store=store, progress=quiet)
        if key in starts:
            params, ppl_init, extra = starts[key]
            unexpected = model.load_state_dict(params, strict=False).unexpected_keys
            assert not unexpected, unexpected
        else:
            extra = _initialise(model, data, cfg, init, ctx)
            ppl_init = perplexity(model, data.heldout, "parallel", cfg.batch_size_eval)
            params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and ".stack." not in n}
            starts[key] = (params, ppl_init, extra)
        layers = run_transfer(model, data, cfg.transfer, ctx)
    ppl = perplexity(model, data.heldout, "parallel", cfg.batch_size_eval)
    return {
        "ppl_init": ppl_init,
        "ppl": ppl,
        "err_before": statistics.mean(r.transfer_mse_before for r in layers),
        "err_after": statistics.mean(r.transfer_mse_after for r in layers),
        "state_MB": _state_bytes(model) / 2**20,
        "seconds": time.time() - start,
        "layer_err_before": [r.transfer_mse_before for r in layers],
        "layer_err_after": [r.transfer_mse_after for r in layers],
        **extra,
    }


FACTORS = ("init", "depth", "loss", "window")


def _pick(rows, **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _mean(rows, key, **where) -> float:
    vals = [r[key] for r in _pick(rows, **where)]
    return statistics.mean(vals) if vals else float("nan")


def _geo(rows, key, **where) -> float:
    """Geometric mean: perplexities span orders of magnitude, so an arithmetic mean is one outlier."""
    vals = [r[key] for r in _pick(rows, **where)]
    return math.exp(statistics.mean(math.log(v) for v in vals)) if vals else float("nan")


def _wins(rows, factor: str, a, b, key: str = "ppl") -> str:
    """'n/N': variants where level ``a`` of ``factor`` beats (lower ``key``) level ``b``, all else equal."""
    others = [f for f in FACTORS if f != factor]
    index = {tuple(r[f] for f in others): r for r in _pick(rows, **{factor: b})}
    pairs = [(r, index[tuple(r[f] for f in others)]) for r in _pick(rows, **{factor: a}) if tuple(r[f] for f in others) in index]
    return f"{sum(x[key] < y[key] for x, y in pairs)}/{len(pairs)}"


def _answers(rows: list[dict], teacher_ppl: float) -> list[str]:
    """Short written answers, drawn from the table: geometric-mean perplexity per level of each
    factor, and paired wins (same other factors)."""
    def levels(factor):
        return sorted({r[factor] for r in rows}, key=lambda x: _geo(rows, "ppl", **{factor: x}))

    def geo(factor, key="ppl"):
        return ", ".join(f"{x}: {_geo(rows, key, **{factor: x}):.1f}" for x in levels(factor))

    out = [f"Teacher {teacher_ppl:.2f}. Perplexities below are geometric means over the other factors; "
           "'a beats b n/N' counts the variants, all other factors equal, where a ends with the lower perplexity."]
    inits = levels("init")
    out.append(
        f"Init — before transfer: {geo('init', 'ppl_init')}; after: {geo('init')}. "
        + "; ".join(f"{inits[0]} beats {b} {_wins(rows, 'init', inits[0], b)}" for b in inits[1:])
        + f"; at budget 0, {inits[0]} beats them {', '.join(_wins(rows, 'init', inits[0], b, 'ppl_init') for b in inits[1:])}."
    )
    depths = sorted({r["depth"] for r in rows})
    out.append(
        f"Stacking — {geo('depth')}; mean relative layer error after transfer: "
        + ", ".join(f"depth {d}: {_mean(rows, 'err_after', depth=d):.3f}" for d in depths) + "; "
        + "; ".join(f"depth {b} beats depth {a} {_wins(rows, 'depth', b, a)}" for a, b in zip(depths, depths[1:])) + "."
    )
    losses = sorted({r["loss"] for r in rows})
    if len(losses) == 2:
        out.append(
            f"Transfer — mean layer error {_mean(rows, 'err_before'):.3f} → {_mean(rows, 'err_after'):.3f}; it fell in "
            f"{sum(r['err_after'] < r['err_before'] for r in rows)}/{len(rows)} variants and perplexity fell in "
            f"{sum(r['ppl'] < r['ppl_init'] for r in rows)}/{len(rows)}. Loss — {geo('loss')}; "
            f"{losses[1]} beats {losses[0]} {_wins(rows, 'loss', losses[1], losses[0])}."
        )
    windows = sorted({r["window"] for r in rows})
    if len(windows) == 2:
        out.append(f"Window — {geo('window')}; w={windows[1]} beats w={windows[0]} {_wins(rows, 'window', windows[1], windows[0])}.")
    return out


@case("ablations")
def ablations(ctx: Context) -> Result:
    spec = yaml.safe_load(CONFIG.read_text())
    base, grid = spec["base"], spec["grid"]
    if ctx.quick:
        base, grid = _merge(base, spec["quick"]["base"]), spec["quick"]["grid"]
    cfg0 = RunConfig.from_dict(base)
    teacher, tokenizer = load_model("demo")
    data = prepare_data(cfg0, teacher, tokenizer)
    teacher_ppl = perplexity(teacher, data.heldout, "teacher", cfg0.batch_size_eval)
    quiet = lambda **kw: tqdm(disable=True, **kw)  # noqa: E731
    variants = list(itertools.product(grid["init"], grid["depth"], grid["loss"], grid["window"]))
    # Finished variants are appended to a JSON-lines file, so an interrupted grid resumes.
    progress_file = ctx.out / ("ablations_quick.jsonl" if ctx.quick else "ablations.jsonl")
    ctx.out.mkdir(parents=True, exist_ok=True)
    done = {}
    if progress_file.exists():
        for line in progress_file.read_text().splitlines():
            row = json.loads(line)
            done[(row["init"], row["depth"], row["loss"], row["window"])] = row
    rows, starts = [], {}
    for n, (init, depth, loss, window) in enumerate(variants):
        if (init, depth, loss, window) in done:
            rows.append(done[(init, depth, loss, window)])
            continue
        over = {"model": {"depth": depth, "window": window}, "transfer": {"xent_weight": spec["xent_weight"] if loss == "mse+attn" else 0.0}}
        cfg = RunConfig.from_dict(_merge(base, over))
        row = {"init": init, "depth": depth, "loss": loss, "window": window}
        row.update(_variant(teacher, data, cfg, init, cfg.seed, quiet, starts))
        row["ppl/teacher"] = row["ppl"] / teacher_ppl
        rows.append(row)
        with progress_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("[%d/%d] %s: ppl %.2f -> %.2f (%.0f s)", n + 1, len(variants), variants[n], row["ppl_init"], row["ppl"], row["seconds"])
    table = [{k: v for k, v in r.items() if not k.startswith("layer_")} for r in rows]

    def plot_ppl(out: Path) -> Path:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(grid["window"]), figsize=(5 * len(grid["window"]), 4), squeeze=False)
        for ax, window in zip(axes[0], grid["window"]):
            for r in rows:
                if r["window"] == window:
                    ax.plot([0, cfg0.transfer.steps], [r["ppl_init"], r["ppl"]], "o-", lw=1,
                            label=f"{r['init']} d{r['depth']} {r['loss']}")
            ax.axhline(teacher_ppl, color="k", ls=":", label="teacher")
            ax.set(yscale="log", xlabel="transfer steps per layer", ylabel="held-out ppl", title=f"window {window}")
            ax.legend(fontsize=5, ncol=2)
        return save_figure(fig, out / "ablation_ppl.png")

    def plot_layers(out: Path) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for init in grid["init"]:
            pick = [r for r in rows if r["init"] == init and r["depth"] == 1 and r["loss"] == "mse" and r["window"] == grid["window"][0]]
            if pick:
                ax.plot(pick[0]["layer_err_before"], "--", label=f"{init} before")
                ax.plot(pick[0]["layer_err_after"], "-", label=f"{init} after")
        ax.set(yscale="log", xlabel="layer", ylabel="relative output MSE", title=f"per-layer transfer error (depth 1, mse, window {grid['window'][0]})")
        ax.legend(fontsize=7)
        return save_figure(fig, out / "ablation_layers.png")

    notes = [
        f"Teacher held-out perplexity {teacher_ppl:.3f} on {data.heldout.numel()} tokens; calibration {data.train.numel()} tokens; "
        f"{cfg0.transfer.steps} transfer steps per layer (batch {cfg0.transfer.batch_size} x {cfg0.seq_len}); config {CONFIG.name}.",
        "err_before/err_after: relative output MSE per layer (mean over layers) on held-out sequences, "
        "after init and after transfer. ppl_init: perplexity right after init (budget 0). seconds: the "
        "variant's wall time; the start shared by one (init, window) counts in the first variant that builds it.",
        *_answers(rows, teacher_ppl),
    ]
    return Result(table, notes=notes, plots=[plot_ppl, plot_layers], extra={"per_layer": rows, "teacher_ppl": teacher_ppl})
