"""Kernel suite: the torch reference, our Triton kernels and flash-linear-attention, side by side.

    python -m benchmarks.kernels --out DIR [--quick] [--threads N]

Ops: ``chunk`` (chunked scan over given features), ``poly`` (polynomial kernel: our fused scan vs
materialising the features, then scanning), ``decode`` (one token against a carried state).
Modes: ``fwd`` and ``fwd+bwd``. On CPU only the torch path runs; on a GPU all three.

Every implementation is checked against the torch reference (outputs, final state and, for
fwd+bwd, the q/k/v gradients) before it is timed; one that disagrees is reported and not timed.
Achieved TFLOP/s and GB/s come from a model of the work (below), next to the device's peak.
Writes DIR/kernels.json, DIR/kernels.md and DIR/kernels.png.

Work model, per forward (C = chunk size 64, G = H/Hk):
  FLOPs = 2 B T (H (F Dv + C (F + Dv)) + Hk F Dv)       (o = q S, in-chunk scores, state update)
  bytes = inputs read once + o (fp32) + final state (fp32);  fwd+bwd counts 3x FLOPs, 3x bytes.
  decode: bytes = state read + written (fp32) + the token's q, k, v, o.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import distill_kernels as ops
from distill.files import atomic_write_text
from distill_kernels import poly

from . import runner
from .runner import save_figure

log = logging.getLogger("benchmarks.kernels")
CHUNK = 64

# name substring -> (dense bf16 TFLOP/s, HBM GB/s), from the vendors' data sheets
PEAKS = {"H200": (989.0, 4800.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


@dataclass(frozen=True)
class Case:
    op: str  # chunk | poly | decode
    T: int  # tokens (decode: 1)
    F: int  # feature dim; for poly the rank r (state rows F = 1 + r + r(r+1)/2)
    B: int = 1
    H: int = 16
    Hk: int = 4
    Dv: int = 65  # head_dim + the normaliser's ones column
    dtype: str = "bfloat16"
    decay: bool = False
    fla: bool = True  # also time fla (its autotuning compiles ~50 configs per kernel and shape)


def gpu_cases() -> list[Case]:
    """Ordered so that the issue's targets come first (results are written after every case)."""
    cases = [Case("decode", 1, F, B=B, H=32, Hk=8, Dv=129) for B in (64, 1) for F in (256, 128)]
    cases += [Case("poly", T, 16, B=2) for T in (4096, 32768)]
    cases += [Case("chunk", T, F, B=2) for F in (128, 256) for T in (1024, 8192, 32768)]
    cases += [Case("chunk", T, F, B=2, fla=False) for F in (64, 153) for T in (1024, 8192, 32768)]
    return cases


def cpu_cases(quick: bool) -> list[Case]:
    Ts, Fs = ((1024, 2048), (64, 128)) if quick else ((1024, 4096, 8192), (64, 128, 153, 256))
    cases = [Case("chunk", T, F, H=4, Hk=2, dtype="float32") for F in Fs for T in Ts]
    cases += [Case("poly", T, 16, H=4, Hk=2, dtype="float32") for T in Ts[:1]]
    cases += [Case("decode", 1, F, B=B, H=8, Hk=2, dtype="float32") for B in (1, 8) for F in Fs]
    return cases


# ------------------------------------------------------------------ implementations


def _fla_chunk(q, k, v, log_decay=None, initial_state=None):
    """fla's chunk_linear_attn on materialised features, k/v repeated for GQA (fla's own GQA is wrong)."""
    from fla.ops.linear_attn import chunk_linear_attn

    from distill_kernels import fla_backend

    if log_decay is not None or initial_state is not None:  # chunk_linear_attn takes neither
        return fla_backend.chunk_linear_attn(q, k, v, log_decay, initial_state)
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.to(q.dtype).repeat_interleave(G, dim=2)
    o, ht = chunk_linear_attn(q, k, v, scale=1.0, normalize=False, output_final_state=True)
    return o.float(), ht.float()[:, ::G]


def _materialised(scan: Callable) -> Callable:
    """Materialise φ(q̃), φ(k̃) in the input dtype (as the poly feature map does), then ``scan``."""

    def fn(q, k, v, c, ld):
        return scan(poly.poly_features(q, 2, c).to(q.dtype), poly.poly_features(k, 2).to(k.dtype), v, ld)

    return fn


def implementations(op: str, every: bool, fla: bool = True) -> dict[str, Callable]:
    """name -> fn(inputs) -> (o, state). The first is the reference; ``every`` adds Triton and
    (with ``fla``) flash-linear-attention."""
    if op == "chunk":
        impls = {"torch": ops.torch_chunk_linear_attn}
        if every:
            from distill_kernels import triton_chunk

            impls |= {"triton": triton_chunk.chunk_linear_attn, "fla": _fla_chunk}
        return _bind(impls, ("q", "k", "v", "ld"), fla)
    if op == "poly":
        impls = {"torch (materialised)": _materialised(ops.torch_chunk_linear_attn)}
        if every:
            from distill_kernels import triton_chunk

            impls |= {
                "triton (fused)": triton_chunk.chunk_poly_attn,
                "triton (materialised)": _materialised(triton_chunk.chunk_linear_attn),
                "fla (materialised)": _materialised(_fla_chunk),
            }
        return _bind(impls, ("q", "k", "v", "c", "ld"), fla)
    impls = {"torch": ops.torch_recurrent_linear_attn}
    if every:
        from distill_kernels import fla_backend, triton_recurrent

        impls |= {
            "triton": lambda q, k, v, ld, s: triton_recurrent.recurrent_linear_attn(q, k, v, ld, s, inplace=True),
            "fla": fla_backend.recurrent_linear_attn,
        }
    return _bind(impls, ("q", "k", "v", "ld", "s"), fla)


def _bind(impls: dict[str, Callable], names: tuple[str, ...], fla: bool) -> dict[str, Callable]:
    """fn(*tensors) -> fn(inputs dict); drops fla's entries unless ``fla``."""
    return {
        name: (lambda fn: lambda x: fn(*(x[n] for n in names)))(fn)
        for name, fn in impls.items()
        if fla or not name.startswith("fla")
    }


def make_inputs(case: Case, device: torch.device, grad: bool, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def rand(*shape, scale=1.0):
        x = (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
        return x.requires_grad_(grad)

    # positive features keep the scan's magnitudes realistic (like elu+1 / softmax maps)
    def feats(*shape):
        x = (torch.rand(*shape, generator=gen, device=device) * (2 / shape[-1])).to(dtype)
        return x.requires_grad_(grad)

    B, T, H, Hk, F, Dv = case.B, case.T, case.H, case.Hk, case.F, case.Dv
    x = {"ld": torch.full((Hk,), math.log(1 - 1 / 64), device=device) if case.decay else None}
    if case.op == "poly":
        x |= {"q": rand(B, T, H, F, scale=F**-0.5), "k": rand(B, T, Hk, F, scale=F**-0.5), "v": rand(B, T, Hk, Dv)}
        x["c"] = torch.tensor([1.0, 1.0, 0.5], device=device).repeat(H, 1)
    else:
        x |= {"q": feats(B, T, H, F), "k": feats(B, T, Hk, F), "v": rand(B, T, Hk, Dv)}
    if case.op == "decode":
        x["s"] = torch.randn(B, Hk, F, Dv, generator=gen, device=device)
    return x


def state_rows(case: Case) -> int:
    return poly.poly_feature_dim(case.F, 2) if case.op == "poly" else case.F


def work(case: Case, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call under the model in the module docstring."""
    B, T, H, Hk, Dv, F = case.B, case.T, case.H, case.Hk, case.Dv, state_rows(case)
    es = torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
    width = case.F  # what is read per token: the features, or the projections for poly
    if case.op == "decode":
        state = 8.0 * B * Hk * F * Dv  # read and written, fp32
        return 2.0 * B * (H + Hk) * F * Dv, state + es * B * ((H + Hk) * F + Hk * Dv) + 4.0 * B * H * Dv
    flops = 2.0 * B * T * (H * (F * Dv + CHUNK * (F + Dv)) + Hk * F * Dv)
    nbytes = es * B * T * ((H + Hk) * width + Hk * Dv) + 4.0 * B * T * H * Dv + 4.0 * B * Hk * F * Dv
    k = 3.0 if mode == "fwd+bwd" else 1.0
    return k * flops, k * nbytes


# ------------------------------------------------------------------ running


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Mean seconds per call: one warm-up (compiles, autotunes), then enough calls to fill ``budget_s``."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    reps = max(2, min(100, int(budget_s / max(once, 1e-6))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def _run(impl, x, mode, leaves, cot):
    """One call; in fwd+bwd mode also the gradients of ``leaves`` under the cotangents ``cot``."""
    o, s = impl(x)
    if mode == "fwd":
        return [o, s]
    return [o, s, *torch.autograd.grad([o, s], [x[n] for n in leaves], cot)]


def run_case(case: Case, mode: str, device: torch.device, quick: bool, every: bool) -> list[dict]:
    grad = mode == "fwd+bwd"
    x = make_inputs(case, device, grad)
    impls = implementations(case.op, every, case.fla)
    leaves = ("q", "k", "v")
    gen = torch.Generator(device=device).manual_seed(1)
    B, T, H, Hk, Dv, F = case.B, case.T, case.H, case.Hk, case.Dv, state_rows(case)
    cot = [torch.randn(shape, generator=gen, device=device) for shape in ((B, T, H, Dv), (B, Hk, F, Dv))]
    tol = 3e-2 if case.dtype != "float32" else 1e-3
    flops, nbytes = work(case, mode)
    peak_tflops, peak_gbs = peaks(device)
    fresh = (lambda: {**x, "s": x["s"].clone()}) if case.op == "decode" else (lambda: x)
    rows, ref = [], None
    for name, impl in impls.items():
        row = {"op": case.op, "mode": mode, "impl": name, "B": B, "T": T, "H": H, "Hk": Hk, "F": F, "Dv": Dv,
               "dtype": case.dtype}
        try:
            with torch.no_grad() if not grad else torch.enable_grad():
                got = _run(impl, fresh(), mode, leaves, cot)
                if ref is None:
                    ref = got
                    row["check"] = _check_reference(case, x, mode, got, device)
                else:
                    errs = [_rel_err(a, b) for a, b in zip(got, ref)]
                    row["check"] = f"max rel err {max(errs):.1e}" + ("" if max(errs) < tol else " FAILED")
                    if max(errs) >= tol:
                        rows.append(row)
                        continue
                del got
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                state_copies = _decode_states(case, x, device)  # decode: cycle states larger than L2
                calls = iter(range(1 << 30))

                def call():
                    xi = {**x, "s": state_copies[next(calls) % len(state_copies)]} if state_copies else x
                    _run(impl, xi, mode, leaves, cot)

                seconds = time_call(call, device, 0.05 if quick else 0.25)
                if device.type == "cuda":
                    row["peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as err:  # one broken implementation must not lose the others' numbers
            log.warning("%s %s %s failed: %s", case, mode, name, err)
            row["check"] = f"error: {type(err).__name__}: {str(err)[:120]}"
            rows.append(row)
            continue
        row |= {"ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12, "GB/s": nbytes / seconds / 1e9}
        if peak_tflops:
            row |= {"% peak FLOP/s": 100 * row["TFLOP/s"] / peak_tflops, "% peak GB/s": 100 * row["GB/s"] / peak_gbs}
        rows.append(row)
    return rows


def _check_reference(case: Case, x: dict, mode: str, got: list, device) -> str:
    """The reference itself (torch chunked/recurrent) against the naive quadratic form on a prefix."""
    n = min(case.T, 256)
    ld = x["ld"]
    q, k, v = (x[name][:, :n].detach() for name in ("q", "k", "v"))
    if case.op == "poly":
        q, k = poly.poly_features(q, 2, x["c"]), poly.poly_features(k, 2)
    o, _ = ops.naive_linear_attn(q, k, v, ld, x.get("s"))
    err = _rel_err(got[0][:, :n], o)
    return f"reference vs naive {err:.1e}" + ("" if err < 1e-4 else " FAILED")


def _decode_states(case: Case, x: dict, device) -> list[torch.Tensor]:
    if case.op != "decode" or device.type != "cuda":
        return []
    nbytes = x["s"].numel() * 4
    return [x["s"].clone() for _ in range(max(1, math.ceil(256 * 2**20 / nbytes)))]


def peaks(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAKS.items() if key in name), (None, None))


# ------------------------------------------------------------------ reporting


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the rows (GPU only)."""
    def ms(**match):
        hits = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "ms" in r]
        return hits[0] if hits else None

    notes = []
    for r in rows:
        if r["op"] == "chunk" and r["impl"] == "triton" and "ms" in r:
            fla = ms(op="chunk", impl="fla", mode=r["mode"], T=r["T"], F=r["F"])
            if fla:
                ratio = fla["ms"] / r["ms"]
                notes.append(f"chunk {r['mode']} T={r['T']} F={r['F']}: fla/ours time = {ratio:.2f} (target >= 1)")
        if r["op"] == "poly" and r["impl"] == "triton (fused)" and "ms" in r:
            for other in ("triton (materialised)", "fla (materialised)"):
                m = ms(op="poly", impl=other, mode=r["mode"], T=r["T"])
                if m:
                    ratio = m["ms"] / r["ms"]
                    note = f"poly {r['mode']} T={r['T']} F={r['F']}: {other} / fused time = {ratio:.2f} (target >= 2)"
                    if r.get("peak MiB") and m.get("peak MiB"):
                        note += f", peak memory = {m['peak MiB'] / r['peak MiB']:.1f}x (target >= 4)"
                    notes.append(note)
        if r["op"] == "decode" and r["impl"] == "triton" and r["B"] == 64 and "% peak GB/s" in r:
            notes.append(f"decode B=64 F={r['F']}: {r['% peak GB/s']:.0f}% of HBM bandwidth (target >= 50%)")
    return notes


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunk = [r for r in rows if r["op"] == "chunk" and "ms" in r]
    features = sorted({r["F"] for r in chunk})
    if not features:
        return
    fig, axes = plt.subplots(1, len(features), figsize=(4 * len(features), 3.2), squeeze=False)
    for ax, F in zip(axes[0], features):
        for impl in dict.fromkeys(r["impl"] for r in chunk):
            for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
                pts = sorted((r["T"], r["ms"]) for r in chunk if (r["F"], r["impl"], r["mode"]) == (F, impl, mode))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {mode}")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"chunked scan, F={F}")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def run_kernel_suite(
    out_dir: str | Path, quick: bool, cases: list[Case] | None = None, every: bool | None = None
) -> dict:
    """Run every case in both modes (decode: fwd only); write kernels.json/.md/.png into ``out_dir``;
    return {"device", "peaks", "rows", "notes"}. ``every`` (default: on a GPU) times Triton and fla
    too; on CPU that needs TRITON_INTERPRET=1 and serves only to smoke-test this runner."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    every = device.type == "cuda" if every is None else every
    cases = cases if cases is not None else (gpu_cases() if device.type == "cuda" else cpu_cases(quick))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    )
    rows: list[dict] = []
    for case in cases:
        for mode in ("fwd",) if case.op == "decode" else ("fwd", "fwd+bwd"):
            start = time.perf_counter()
            rows += run_case(case, mode, device, quick, every)
            log.info("%s %s done in %.1f s", asdict(case), mode, time.perf_counter() - start)
        data = write_results(out, name, device, rows, every)  # after every case: a timeout keeps the rest
    try:
        plot(rows, out / "kernels.png")
    except Exception as err:  # a broken plot must not lose the numbers
        log.warning("plot failed: %s", err)
    return data


@runner.case("kernels")
def kernels_case(ctx: runner.Context) -> runner.Result:
    """The op-level suite as a case of ``python -m benchmarks`` (its own report goes to DIR/kernels/)."""
    data = run_kernel_suite(ctx.out / "kernels", ctx.quick)
    return runner.Result(data["rows"], notes=data["notes"] + ["Full report: kernels/kernels.md and kernels/kernels.png."])


def write_results(out: Path, name: str, device: torch.device, rows: list[dict], every: bool) -> dict:
    peak_tflops, peak_gbs = peaks(device)
    notes = [f"device: {name}; peak dense bf16 {peak_tflops or 'n/a'} TFLOP/s, HBM {peak_gbs or 'n/a'} GB/s"]
    if not every:
        notes.append("CPU: only the torch path is timed (Triton and fla need a GPU)")
    notes += summary(rows)
    data = {"device": name, "peaks": {"TFLOP/s": peak_tflops, "GB/s": peak_gbs}, "rows": rows, "notes": notes}
    runner.write_json(out / "kernels.json", data)
    md = "# Kernel benchmarks\n\n" + "".join(f"- {n}\n" for n in notes)
    for op in dict.fromkeys(r["op"] for r in rows):
        md += f"\n## {op}\n\n" + runner.markdown_table([r for r in rows if r["op"] == op])
    atomic_write_text(out / "kernels.md", md)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for kernels.json, kernels.md, kernels.png")
    parser.add_argument("--quick", action="store_true", help="CPU: fewer, smaller cases and shorter timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_kernel_suite(args.out, args.quick)
    log.info("wrote %s", args.out / "kernels.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
