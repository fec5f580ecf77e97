"""bf16 weights: ``model.to(torch.bfloat16)`` on a converted model keeps decays, fixed
coefficients and recurrent states in fp32, keeps polynomial kernels positive and the logits finite.

Every registered feature map (registry-driven, see STYLE.md), depth 1, windows 0 and 8, with
the fixed decay so that the ``fixed_log_decay`` buffer exists.
"""
import pytest
import torch
from conftest import perturb_new_parameters, tiny_model

from distill import convert_model
from distill.feature_maps import FEATURE_MAPS
from distill.feature_maps.builtin import PolynomialKernel
from distill.layer import LinearAttention

CASES = [(name, window) for name in sorted(FEATURE_MAPS) for window in (0, 8)]
IDS = [f"{name}-w{window}" for name, window in CASES]
POLY_CASES = [(name, window) for name, window in CASES if issubclass(FEATURE_MAPS[name], PolynomialKernel)]

# Per-head (c_1, c_2) of a degree-2 polynomial. c_0 is put where the transfer stage's positivity
# projection (fit.keep_poly_positive) leaves it when a step pushes it down: on the bound
# c_0 = c_1²/(4 c_2) + 1e-4·max|c|. That slack is below bf16 resolution (8 bits, ~4e-3 relative),
# so a plain cast moves the minimum min_x p(x) = c_0 − c_1²/(4 c_2) below 0 for the first and third
# heads here (checked: −6.0e-4 and −1.7e-3), which turns the normaliser φ(q)·z negative.
BOUNDARY_C1_C2 = [(0.7, 0.45), (-1.0, 0.3), (1.1, 0.9), (-2.0, 1.7)]


def linear_layers(model) -> list[LinearAttention]:
    return [m for m in model.modules() if isinstance(m, LinearAttention)]


def feature_maps(model):
    for attn in linear_layers(model):
        yield attn.rnn.feature_map
        for sub in attn.stack:
            yield sub.rnn.feature_map


@torch.no_grad()
def put_on_positivity_bound(fm: PolynomialKernel) -> None:
    """Degree-2 coefficients as training leaves them (see BOUNDARY_C1_C2), in fp32."""
    if fm.degree != 2 or not isinstance(fm.coeffs, torch.nn.Parameter):
        return  # fixed coefficients (taylor) stay as built
    rows = []
    for h in range(fm.coeffs.shape[0]):
        c1, c2 = BOUNDARY_C1_C2[h % len(BOUNDARY_C1_C2)]
        vertex = c1 * c1 / (4 * c2)
        rows.append([vertex + 1e-4 * max(vertex, abs(c1), c2), c1, c2])
    fm.coeffs.copy_(torch.tensor(rows, dtype=torch.float32))


def student(name: str, window: int):
    """A tiny random Llama converted with ``name``, its new parameters moved off their initial
    values (and polynomial coefficients put on the positivity bound), still in fp32."""
    model = convert_model(tiny_model("llama"), {"feature_map": name, "window": window, "depth": 1, "decay": "fixed"})
    perturb_new_parameters(model)
    for fm in feature_maps(model):
        if isinstance(fm, PolynomialKernel):
            put_on_positivity_bound(fm)
    return model


def conversion_buffers(model) -> dict[str, torch.Tensor]:
    """Floating-point buffers that conversion added: decays, fixed coefficients (not the
    teacher's, which a LinearAttention shares but does not own)."""
    shared = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    found = {}
    for i, attn in enumerate(linear_layers(model)):
        for name, buf in attn.named_buffers():
            if name.split(".")[0] not in shared and buf.is_floating_point():
                found[f"layer {i}: {name}"] = buf
    return found


@pytest.mark.parametrize("name, window", CASES, ids=IDS)
def test_bf16_keeps_decays_and_fixed_coefficients_fp32(name, window):
    model = student(name, window).to(torch.bfloat16)
    buffers = conversion_buffers(model)
    assert any(key.endswith("fixed_log_decay") for key in buffers), sorted(buffers)  # decay="fixed" has one
    if name == "taylor":
        assert any(key.endswith("feature_map.coeffs") for key in buffers), sorted(buffers)
    not_fp32 = {key: buf.dtype for key, buf in buffers.items() if buf.dtype != torch.float32}
    assert not not_fp32, f"after model.to(bfloat16) these must stay float32: {not_fp32}"


@pytest.mark.parametrize("name, window", POLY_CASES, ids=[f"{n}-w{w}" for n, w in POLY_CASES])
def test_bf16_polynomial_kernel_stays_positive(name, window):
    model = student(name, window)
    maps = list(feature_maps(model))
    x = torch.linspace(-1e3, 1e3, 200_001, dtype=torch.float64)

    def minimum(coeffs: torch.Tensor) -> tuple[float, int]:
        """min over heads of p(x) = Σ_i c_i x^i on the grid (plus each head's vertex for degree
        2, where a parabola is lowest), evaluated in float64 from the stored coefficients."""
        c = coeffs.detach().double()  # (H, p+1), exact copies of the stored values
        grid = x.expand(len(c), -1)
        if c.shape[1] == 3:
            vertex = -c[:, 1:2] / (2 * c[:, 2:3])  # (H, 1)
            grid = torch.cat([grid, vertex], dim=1)
        powers = torch.arange(c.shape[1], dtype=torch.float64)
        p = (c[:, None, :] * grid[..., None] ** powers).sum(-1)  # (H, n)
        low = p.min(dim=1).values
        return float(low.min()), int(low.argmin())

    for fm in maps:  # the fp32 model is positive: the test starts from a valid state
        assert minimum(fm.coeffs)[0] > 0, fm.coeffs
    model.to(torch.bfloat16)
    for i, fm in enumerate(maps):
        low, head = minimum(fm.coeffs)
        assert low > 0, (
            f"feature map {i}: after model.to(bfloat16) p(x) reaches {low:.3g} for head {head} "
            f"(coefficients {fm.coeffs[head].tolist()}, dtype {fm.coeffs.dtype}); a polynomial kernel must stay positive"
        )


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
@pytest.mark.parametrize("name, window", CASES, ids=IDS)
def test_bf16_logits_are_finite(name, window, mode, tokens):
    model = student(name, window).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(tokens, use_cache=False, distill_mode=mode).logits  # (B, T, V)
    bad = (~torch.isfinite(logits)).sum().item()
    assert bad == 0, f"{bad} of {logits.numel()} logits are not finite in {mode} mode (bf16)"


@pytest.mark.parametrize("name, window", CASES, ids=IDS)
def test_bf16_recurrent_state_stays_fp32(name, window, tokens):
    """Prefill (chunked) then one decoding step (recurrent): every state stays fp32."""
    model = student(name, window).to(torch.bfloat16)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :-1], cache=cache, use_cache=True)
        model(tokens[:, -1:], cache=cache, use_cache=True)
    dtypes = {
        f"layer {i} sublayer {j}": state.dtype
        for i, layer in enumerate(cache.layers)
        for j, state in enumerate(getattr(layer, "states", None) or [])
    }
    assert dtypes, "the cache holds no recurrent state"
    assert all(d == torch.float32 for d in dtypes.values()), dtypes
