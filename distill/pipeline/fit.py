"""Stage 1, fit: initialise each feature map from the teacher's own scores, without gradients.

For each converted layer, the teacher runs on a few calibration sequences and we keep its
post-RoPE q [B,T,H,D] and k [B,T,Hk,D] (the teacher's scores), and the q and k that the feature
maps read (the same, or, with ``linear_rope: false``, before RoPE). For sampled queries t and every key s, with scores
s_ts = q_t·k_s/√d, softmax weights a_ts and log-normaliser ℓ_t = log Σ_s e^{s_ts}, the student's
kernel κ_ts = φ(q_t)·φ(k_s) should satisfy

    λ_h e^{−ℓ_t} κ_ts ≈ a_ts      on the keys the linear part covers (all, or those older than the window),

i.e. φ(q)·φ(k) ∝ exp(s − m). Pairs are weighted by ω_ts = a_ts + u / n_t (softmax weight, plus
a uniform share so that low scores cannot quietly steal mass). ``fit_error`` is the weighted
relative RMS sqrt(Σ ω (λ e^{−ℓ} κ − a)² / Σ ω a²) with the best per-head λ, and ``attn_kl`` is
KL(teacher softmax ‖ student weights) per query. With a window (LoLCATs-style hybrid) the
best λ_h is exactly the mixing factor g_h, so log_mix starts at log λ_h.

Fitters, by registered feature-map name (a map registered under another name, or loaded as
``module:Class``, keeps its own init unless it subclasses one of these):
- ``poly``: projection P from the q/k second moments (eigenvectors of Cq·Ck + Ck·Cq, the
  directions that carry most of q·k), scaled so that |x| ≤ 1 for x = q̃·k̃ (every coefficient
  is then O(1), which Adam needs later). Coefficients come from weighted least squares under
  the constraint p(x) ≥ margin · p(x_max) on a grid around the observed x (SLSQP); for even
  degree the leading coefficient is ≥ 0, and for degree 2 the minimum over ℝ obeys the same
  margin, so p > 0 everywhere and the normaliser is positive (and far enough from zero that
  gradient steps in the transfer stage cannot flip its sign). Least squares on weights
  under-penalises mass spread thinly over many low-score keys, so a short refinement of the
  attention KL itself follows (``fit.refine_iters``): degree 2 as p = (x − v)² + b, positive by
  construction, with L-BFGS; other degrees with SLSQP under the same constraints.
- ``hedgehog``/``t2r``: the identity start scaled per head by the factor (from a log grid)
  with the lowest attention KL.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize

from ..distributed import gathered, is_sharded
from ..layer import LinearAttention
from .attention_weights import attention_kl, linear_keys, query_index, student_kernel, student_weights, teacher_scores
from .layerwise import attention_input, decoder_layers, embed, position_embeddings, run_layer
from .params import converted_layers, layer_state, load_state, model_state
from .run_config import FitConfig
from .train import StageContext

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    """Teacher statistics of one layer on the fit sequences (shapes use n sampled queries)."""

    q: torch.Tensor  # (B, T, H, D) as the feature maps read it
    k: torch.Tensor  # (B, T, Hk, D) as the feature maps read it
    idx: torch.Tensor  # (n,)
    scores: torch.Tensor  # (B, H, n, T), −inf where masked
    lse: torch.Tensor  # (B, H, n)
    attn: torch.Tensor  # (B, H, n, T) teacher softmax weights
    weight: torch.Tensor  # (B, H, n, T) ω on the linear part's keys, 0 elsewhere


def make_pairs(layer: LinearAttention, q: torch.Tensor, k: torch.Tensor, cfg: FitConfig, features=None) -> Pairs:
    """Pairs from the teacher's (rotated) q, k; ``features``: (q, k) as the feature maps read them
    (default q, k)."""
    T = q.shape[1]
    idx = query_index(T, cfg.queries, start=layer.window, device=q.device)
    scores = teacher_scores(layer, q, k, idx)
    lse = torch.logsumexp(scores, dim=-1)
    attn = torch.exp(scores - lse[..., None])
    linear = linear_keys(layer, idx, T) & torch.isfinite(scores)
    n_keys = torch.isfinite(scores).sum(-1, keepdim=True).clamp(min=1)
    weight = (attn + cfg.uniform_weight / n_keys) * linear
    return Pairs(*(features or (q, k)), idx, scores, lse, attn, weight)


def scale_and_error(kappa: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Best per-head λ [H] in λ e^{−ℓ} κ ≈ a, and the weighted relative RMS error [H] at that λ."""
    z = (kappa.double() * torch.exp(-pairs.lse.double())[..., None])  # (B, H, n, T)
    w, a = pairs.weight.double(), pairs.attn.double()
    dims = (0, 2, 3)
    zz = (w * z * z).sum(dims)
    lam = torch.where(zz > 0, (w * z * a).sum(dims) / zz.clamp(min=1e-300), torch.ones_like(zz))
    lam = lam.clamp(min=1e-30)
    resid = (w * (lam[None, :, None, None] * z - a) ** 2).sum(dims)
    err = torch.sqrt(resid / (w * a * a).sum(dims).clamp(min=1e-300))
    return lam, err


@torch.no_grad()
def measure(layer: LinearAttention, pairs: Pairs) -> dict[str, torch.Tensor]:
    """Per-head fit error, attention KL and best scale λ of the layer's current feature map."""
    kappa = student_kernel(layer, pairs.q, pairs.k, pairs.idx)
    lam, err = scale_and_error(kappa, pairs)
    kl = attention_kl(pairs.scores, student_weights(layer, pairs.q, pairs.k, pairs.idx, pairs.scores, kappa))
    return {"fit_error": err.float(), "attn_kl": kl.float(), "scale": lam}


# ---- fitters, by feature-map name -----------------------------------------------------------

Fitter = Callable[[LinearAttention, Pairs, FitConfig], None]
FITTERS: dict[str, Fitter] = {}


def register_fitter(*names: str):
    """Decorator: ``@register_fitter("poly")`` fits maps registered as ``poly``."""

    def wrap(fn: Fitter) -> Fitter:
        for name in names:
            if name in FITTERS:
                raise ValueError(f"a fitter for feature map {name!r} is already registered")
            FITTERS[name] = fn
        return fn

    return wrap


def find_fitter(feature_map) -> Fitter | None:
    """The fitter of the map's registered name (inherited by subclasses), or None."""
    return FITTERS.get(type(feature_map).name)


def principal_directions(q: torch.Tensor, k: torch.Tensor, group: int, rank: int) -> torch.Tensor:
    """P [Hk, D, r]: per kv head, the top eigenvectors of Cq·Ck + Ck·Cq (second moments)."""
    B, T, H, D = q.shape
    qg = q.double().reshape(B * T, H // group, group, D)  # (N, Hk, G, D)
    cq = torch.einsum("nigd,nige->ide", qg, qg) / (B * T * group)  # (Hk, D, D)
    kd = k.double().reshape(B * T, -1, D)
    ck = torch.einsum("nid,nie->ide", kd, kd) / (B * T)
    sym = cq @ ck + ck @ cq
    _, vecs = torch.linalg.eigh(sym)  # ascending
    return vecs[..., -rank:].flip(-1)  # (Hk, D, r)


def positivity_constraints(grid: np.ndarray, top: float, degree: int, margin: float) -> list[dict]:
    """SLSQP constraints on c [p+1] of p(u) = Σ_i c_i u^i: p ≥ margin · p(top) on ``grid`` and
    p(top) ≥ 1e-6 (the scale is free; this keeps it off zero). Even degree: c_p ≥ 0; degree 2:
    min_ℝ p = c_0 − c_1²/(4 c_2) ≥ margin · p(top), so p > 0 on all of ℝ. A margin above 0 keeps
    the normaliser away from zero, where gradient training would be unstable."""
    powers = np.arange(degree + 1)
    at_top = top**powers  # (p+1,)
    rows = grid[:, None] ** powers[None, :] - margin * at_top[None, :]  # (G, p+1)
    cons = [
        {"type": "ineq", "fun": lambda c: rows @ c, "jac": lambda c: rows},
        {"type": "ineq", "fun": lambda c: np.array([at_top @ c - 1e-6]), "jac": lambda c: at_top[None]},
    ]
    if degree % 2 == 0:
        lead = np.eye(degree + 1)[degree][None]
        cons.append({"type": "ineq", "fun": lambda c: c[degree:], "jac": lambda c: lead})
    if degree == 2:
        e0, e1, e2 = np.eye(3)

        def gap(c):  # 4 c_2 (c_0 − m p(top)) − c_1²  ≥ 0
            return np.array([4 * c[2] * (c[0] - margin * at_top @ c) - c[1] ** 2])

        def gap_jac(c):
            floor = c[0] - margin * at_top @ c
            return (4 * c[2] * (e0 - margin * at_top) + 4 * floor * e2 - 2 * c[1] * e1)[None]

        cons.append({"type": "ineq", "fun": gap, "jac": gap_jac})
    return cons


def feasible(coeffs: np.ndarray, cons: list[dict], tol: float = 0.0) -> bool:
    return all(np.all(np.atleast_1d(con["fun"](coeffs)) >= -tol) for con in cons)


def solve_positive_ls(a_mat: np.ndarray, target: np.ndarray, w: np.ndarray, cons: list[dict]) -> np.ndarray:
    """min_c Σ_j w_j (A c − target)_j² under ``cons`` (SLSQP); a_mat [N, p+1] -> c [p+1]."""
    degree = a_mat.shape[1] - 1
    q_mat = a_mat.T @ (w[:, None] * a_mat)
    b_vec = a_mat.T @ (w * target)
    norm = max(np.trace(q_mat), 1e-300)
    q_mat, b_vec = q_mat / norm, b_vec / norm
    try:  # the unconstrained optimum is often feasible already
        free = np.linalg.solve(q_mat + 1e-12 * np.eye(degree + 1), b_vec)
        if feasible(free, cons):
            return free
    except np.linalg.LinAlgError:
        pass
    start = np.array([1.0 / math.factorial(i) for i in range(degree + 1)])
    result = minimize(
        lambda c: c @ q_mat @ c - 2 * b_vec @ c,
        start,
        jac=lambda c: 2 * q_mat @ c - 2 * b_vec,
        constraints=cons,
        method="SLSQP",
        options={"maxiter": 500, "ftol": 1e-14},
    )
    if not feasible(result.x, cons, 1e-9):
        log.warning("polynomial fit missed its positivity constraint (%s); keeping Taylor coefficients", result.message)
        return start
    return result.x


def kl_objective(vander: np.ndarray, rows: np.ndarray, attn: np.ndarray):
    """c -> (Σ_r ρ_r KL(ā_r ‖ p/Σp) up to a constant, gradient). ā_r is the teacher's softmax
    restricted to the pairs of row (query) r and ρ_r its mass there; p_j = vander_j · c.

    vander [N, p+1] (u_j^i), rows [N] query of each pair, attn [N] teacher weights a_j."""
    n_rows = int(rows.max()) + 1
    mass = np.bincount(rows, weights=attn, minlength=n_rows)  # ρ_r
    cond = attn / np.maximum(mass[rows], 1e-300)  # ā_j
    rho = mass / max(mass.sum(), 1e-300)

    def objective(c):
        p = np.maximum(vander @ c, 1e-300)
        z = np.maximum(np.bincount(rows, weights=p, minlength=n_rows), 1e-300)
        value = -(rho[rows] * cond * np.log(p)).sum() + (rho * np.log(z)).sum()
        grad = -((rho[rows] * cond / p)[:, None] * vander).sum(0) + ((rho / z)[rows][:, None] * vander).sum(0)
        return value, grad

    return objective


def refine_kl(starts: list[np.ndarray], objective, cons: list[dict], top: float, margin: float, iters: int) -> np.ndarray:
    """Lower the attention KL from each of ``starts`` within the positivity constraints; returns
    the best coefficients found (a start if nothing improves on it).

    Degree 2 is searched as p(u) = (u − v)² + b with b = e^β + margin·(top − v)²/(1 − margin),
    positive everywhere by construction (the KL ignores the overall scale), with L-BFGS; other
    degrees use SLSQP under ``cons``."""
    best, best_value = starts[0], objective(starts[0])[0]

    def consider(c):
        nonlocal best, best_value
        value = objective(c)[0]
        if np.isfinite(value) and value < best_value and feasible(c, cons, 1e-9):
            best, best_value = c, value

    for start in starts:
        consider(start)
        if len(start) == 3 and start[2] > 0:
            k = margin / (1 - margin)

            def coeffs(theta):
                v, beta = theta
                b = np.exp(beta) + k * (top - v) ** 2
                return np.array([v * v + b, -2 * v, 1.0])

            def value_grad(theta):
                v, beta = theta
                value, g = objective(coeffs(theta))
                dc_dv = np.array([2 * v - 2 * k * (top - v), -2.0, 0.0])
                dc_db = np.array([np.exp(beta), 0.0, 0.0])
                return value, np.array([g @ dc_dv, g @ dc_db])

            v0 = -start[1] / (2 * start[2])
            b0 = start[0] / start[2] - v0 * v0 - k * (top - v0) ** 2
            result = minimize(value_grad, np.array([v0, np.log(max(b0, 1e-12))]), jac=True, method="L-BFGS-B", options={"maxiter": iters})
            consider(coeffs(result.x))
        else:
            start = start / max(np.abs(start).max(), 1e-300)
            result = minimize(objective, start, jac=True, constraints=cons, method="SLSQP", options={"maxiter": iters})
            consider(result.x)
    return best


@register_fitter("poly")
@torch.no_grad()
def fit_poly(layer: LinearAttention, pairs: Pairs, cfg: FitConfig) -> None:
    fm = layer.rnn.feature_map
    G = layer.num_heads // layer.num_kv_heads
    finite = torch.isfinite(pairs.scores)

    def projected_scores():  # x = q̃·k̃ [B, H, n, T]
        qt = fm.project_q(pairs.q[:, pairs.idx].float())  # (B, n, H, r)
        kt = fm.project_k(pairs.k.float()).repeat_interleave(G, dim=2)  # (B, T, H, r)
        return torch.einsum("bnhr,bshr->bhns", qt, kt).double()

    if fm.proj is not None:
        fm.proj.copy_(principal_directions(pairs.q, pairs.k, G, fm.rank).to(fm.proj.dtype))
        # Scale P so that |x| ≤ 1 over each kv group: the coefficients of x^i are then all O(1),
        # which keeps Adam's per-coordinate steps sensible in the transfer stage.
        span = projected_scores().masked_fill(~finite, 0).abs().amax(dim=(0, 2, 3))  # (H,)
        span = span.view(-1, G).amax(dim=1).clamp(min=1e-6)  # (Hk,)
        fm.proj.div_(span.sqrt()[:, None, None].to(fm.proj.dtype))
    x = projected_scores()
    powers = np.arange(fm.degree + 1)
    for h in range(layer.num_heads):
        use = pairs.weight[:, h] > 0  # (B, n, T)
        if not bool(use.any()):
            continue
        xs = x[:, h][finite[:, h]]
        span = max(float(xs.abs().max()), 1e-6)
        u = (x[:, h][use] / span).cpu().numpy()
        vander = u[:, None] ** powers[None, :]
        shift = float(pairs.lse[:, h].median())  # keeps r = e^{shift − ℓ} near 1
        r = torch.exp(shift - pairs.lse[:, h].double())[..., None].expand_as(use)[use].cpu().numpy()
        attn = pairs.attn[:, h][use].double().cpu().numpy()
        lo, hi = float(xs.min()) / span, float(xs.max()) / span
        pad = 0.5 * (hi - lo)
        cons = positivity_constraints(np.linspace(lo - pad, hi + pad, cfg.grid), hi, fm.degree, cfg.margin)
        coeffs = solve_positive_ls(r[:, None] * vander, attn, pairs.weight[:, h][use].double().cpu().numpy(), cons)
        if cfg.refine_iters:
            rows = torch.arange(use.shape[0] * use.shape[1]).view(use.shape[:2])[..., None].expand_as(use)[use].numpy()
            taylor = np.array([span**i / math.factorial(i) for i in powers])
            objective = kl_objective(vander, rows, attn)
            coeffs = refine_kl([coeffs, taylor], objective, cons, hi, cfg.margin, cfg.refine_iters)
        # Back to the unscaled x: c_i / span^i. The overall scale is left to log_mix (or cancels in
        # the normalisation), which keeps the coefficients near O(1) in fp32.
        coeffs = coeffs / span**powers
        coeffs = coeffs / max(np.abs(coeffs).max(), 1e-30)
        fm.coeffs[h].copy_(torch.from_numpy(coeffs).to(fm.coeffs.dtype))


SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


@register_fitter("hedgehog", "t2r")
@torch.no_grad()
def fit_identity_scale(layer: LinearAttention, pairs: Pairs, cfg: FitConfig) -> None:
    """Scale the per-head projections (identity at start) by the factor with the lowest KL."""
    fm = layer.rnn.feature_map
    G = layer.num_heads // layer.num_kv_heads
    base_q = (fm.proj_q.weight.clone(), fm.proj_q.bias.clone())
    base_k = (fm.proj_k.weight.clone(), fm.proj_k.bias.clone())
    kls = []
    for alpha in SCALES:
        for proj, (weight, bias) in ((fm.proj_q, base_q), (fm.proj_k, base_k)):
            proj.weight.copy_(weight * alpha)
            proj.bias.copy_(bias * alpha)
        if layer.window:
            set_mix(layer, pairs)
        kls.append(measure(layer, pairs)["attn_kl"])
    best = torch.stack(kls).argmin(0)  # (H,) best scale per query head
    alpha_q = torch.tensor(SCALES)[best].to(fm.proj_q.weight)
    # Key projections are shared by a group of query heads: use the group's most common choice.
    alpha_k = torch.tensor(SCALES)[best.view(-1, G).mode(dim=1).values].to(fm.proj_k.weight)
    fm.proj_q.weight.copy_(base_q[0] * alpha_q[:, None, None])
    fm.proj_q.bias.copy_(base_q[1] * alpha_q[:, None])
    fm.proj_k.weight.copy_(base_k[0] * alpha_k[:, None, None])
    fm.proj_k.bias.copy_(base_k[1] * alpha_k[:, None])


@torch.no_grad()
def set_mix(layer: LinearAttention, pairs: Pairs) -> None:
    """log_mix ← log λ_h, the scale that makes the linear part carry the teacher's mass."""
    lam, _ = scale_and_error(student_kernel(layer, pairs.q, pairs.k, pairs.idx), pairs)
    layer.log_mix.copy_(torch.log(lam).to(layer.log_mix.dtype))


# ---- the stage ---------------------------------------------------------------------------------


@torch.no_grad()
def collect_qk(model, ids: torch.Tensor, layers: list[int], batch: int, last: int = -1):
    """Yield (layer index, q [B,T,H,D], k [B,T,Hk,D], (q, k) as the feature maps read them) from
    the teacher, one layer at a time; the pass goes on to the last of ``layers`` or to ``last``
    (a sharded model: every rank goes through the same layers)."""
    wanted = set(layers)
    last = max(last, *wanted) if wanted else last
    if last < 0:  # every layer kept as softmax: nothing to fit
        return
    hidden = embed(model, ids, batch)
    for i, decoder_layer in enumerate(decoder_layers(model)):
        if i > last:
            break
        with gathered(decoder_layer):
            if i in wanted:
                x = attention_input(model, i, hidden)
                attn, rope = decoder_layer.self_attn, position_embeddings(model, x)
                q, k, _ = attn.project(x, rope)
                qf, kf = attn.feature_inputs(q, k, rope)
                q, k = q.float(), k.float()
                yield i, q, k, ((qf.float(), kf.float()) if attn.unrotates else (q, k))
            hidden = run_layer(model, i, hidden, "teacher", batch)


@dataclass
class FitLayer:
    """Result of one layer: mean fit error and attention KL over its heads before (``_init``) and
    after the fit, and the same per head under ``heads``."""

    layer: int
    fit_error: float
    attn_kl: float
    fit_error_init: float
    attn_kl_init: float
    heads: list[dict] = field(default_factory=list)


def _summary(before: dict, after: dict, index: int) -> FitLayer:
    heads = [
        {
            "head": h,
            "fit_error": float(after["fit_error"][h]),
            "attn_kl": float(after["attn_kl"][h]),
            "fit_error_init": float(before["fit_error"][h]),
            "attn_kl_init": float(before["attn_kl"][h]),
        }
        for h in range(len(after["fit_error"]))
    ]
    return FitLayer(
        layer=index,
        fit_error=float(after["fit_error"].mean()),
        attn_kl=float(after["attn_kl"].mean()),
        fit_error_init=float(before["fit_error"].mean()),
        attn_kl_init=float(before["attn_kl"].mean()),
        heads=heads,
    )


KEY = "fit"


def run_fit(model, data, cfg: FitConfig, ctx: StageContext) -> list[FitLayer]:
    """Fit every converted layer on the first ``cfg.sequences`` of ``data.train`` [N, T];
    checkpointed as one entry. Returns per-layer metrics (see the module docstring)."""
    if ctx.store.has(KEY):
        tensors, meta = ctx.store.load(KEY)
        load_state(model, tensors)
        return [FitLayer(**r) for r in meta["layers"]]
    start = time.time()
    ids = data.train[: cfg.sequences]
    layers = converted_layers(model)
    mine = layers[ctx.comm.shard(len(layers))]  # with several ranks, each fits its share of the layers
    results = []
    bar = ctx.progress(total=len(mine), desc="fit", unit="layer")
    fitter = None
    try:
        last = max(layers, default=-1) if is_sharded(model) else -1
        for i, q, k, features in collect_qk(model, ids, mine, batch=max(1, len(ids)), last=last):
            layer = decoder_layers(model)[i].self_attn
            pairs = make_pairs(layer, q, k, cfg, features)
            before = measure(layer, pairs)
            fitter = find_fitter(layer.rnn.feature_map)
            if fitter is not None:
                fitter(layer, pairs, cfg)
            if layer.window:
                set_mix(layer, pairs)
            after = measure(layer, pairs)
            results.append(_summary(before, after, i))
            bar.set_postfix(kl=f"{results[-1].attn_kl:.3f}", err=f"{results[-1].fit_error:.3f}")
            bar.update(1)
            log.debug("fit layer %d: fit error %.4f, attn KL %.4f", i, results[-1].fit_error, results[-1].attn_kl)
    finally:
        bar.close()
    if fitter is None and mine:
        log.info("no closed-form start for %s; its default init is kept", type(layer.rnn.feature_map).__name__)
    if ctx.comm.active:  # every rank gets every layer's fit
        parts = ctx.comm.gather(([asdict(r) for r in results], {n: t for i in mine for n, t in layer_state(model, i).items()}))
        load_state(model, {n: t for _, state in parts for n, t in state.items()})
        results = sorted((FitLayer(**r) for rows, _ in parts for r in rows), key=lambda r: r.layer)
    meta = {"layers": [asdict(r) for r in results], "seconds": time.time() - start, "tokens": int(ids.numel())}
    ctx.store.save(KEY, model_state(model), meta)
    return results
