import math

import pytest
import torch

from distill.errors import DistillError
from distill.feature_maps import FEATURE_MAPS, FeatureMap, build_feature_map, register_feature_map

D, H, HK = 16, 4, 2

# Built-ins whose features are >= 0: what each class must declare as ``nonnegative_features``.
NONNEGATIVE_FEATURES = {"elu", "relu", "t2r", "hedgehog"}


def promises(cls) -> tuple[bool, bool]:
    """(kernel > 0, features >= 0), as the map class declares them."""
    return cls.positive, cls.nonnegative_features


def perturb_(fm, seed=0, scale=0.5) -> None:
    """Move every parameter off its initial value, then back inside the map's constraints: a promise
    must hold for any parameters training can reach, not just for the identity-like start."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    fm.constrain_()


def kernel_of(pq, pk):
    """φ(q) [B,T,H,F], φ(k) [B,S,Hk,F] -> every φ(q_t)·φ(k_s) [B, Hk, G, T, S]."""
    B, T = pq.shape[:2]
    return torch.einsum("btigf,bsif->bigts", pq.view(B, T, HK, H // HK, -1), pk)


@pytest.mark.parametrize("params", ["initial", "perturbed"])
@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_every_registered_map(name, params):
    """Shape, feature_dim, finiteness, and what the map promises: φ(q)·φ(k) > 0 where ``positive``,
    φ >= 0 where its features are non-negative."""
    fm = build_feature_map(name, {}, D, H, HK)
    if params == "perturbed":
        perturb_(fm)
    torch.manual_seed(0)
    q, k = torch.randn(2, 7, H, D) * 2, torch.randn(2, 7, HK, D) * 2
    with torch.no_grad():
        pq, pk = fm.phi_q(q), fm.phi_k(k)
    assert pq.shape == (2, 7, H, fm.feature_dim)
    assert pk.shape == (2, 7, HK, fm.feature_dim)
    assert torch.isfinite(pq).all() and torch.isfinite(pk).all()
    positive, nonnegative = promises(type(fm))
    if positive:
        assert (kernel_of(pq, pk) > 0).all()
    if nonnegative:
        assert (pq >= 0).all() and (pk >= 0).all()
        assert (pq > 0).any() and (pk > 0).any()  # not vacuously: relu of everything negative is 0


def test_promises_cover_the_known_maps():
    """The table above and the classes agree on the built-ins (a map that changes its promise
    must say so in its class, and the promise is then tested)."""
    assert {name for name, cls in FEATURE_MAPS.items() if promises(cls)[1]} >= NONNEGATIVE_FEATURES & set(FEATURE_MAPS)
    assert not FEATURE_MAPS["poly"].positive  # depends on the fitted coefficients: see the test below
    assert all(isinstance(cls.positive, bool) for cls in FEATURE_MAPS.values())


@pytest.mark.parametrize("kwargs", [{}, {"rank": 5}], ids=["identity", "rank5"])
def test_poly_with_taylor_coefficients_is_positive(kwargs):
    """poly promises nothing in general, but its default coefficients (1, 1, 1/2: Taylor) give
    p(s) = 1 + s + s²/2 >= 1/2 for every s, whatever the projection."""
    fm = build_feature_map("poly", {"degree": 2, **kwargs}, D, H, HK)
    torch.testing.assert_close(fm.coeffs, torch.tensor([1.0, 1.0, 0.5]).repeat(H, 1))
    if fm.proj is not None:
        with torch.no_grad():
            fm.proj.add_(torch.randn(fm.proj.shape, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, H, D) * 3, torch.randn(2, 9, HK, D) * 3
    with torch.no_grad():
        kernel = kernel_of(fm.phi_q(q), fm.phi_k(k))
    assert (kernel > 0).all()
    assert kernel.min() > 0.49


def test_taylor_is_exact_second_order_exp():
    fm = build_feature_map("taylor", {}, D, H, H)
    q, k = torch.randn(3, 5, H, D, dtype=torch.float64), torch.randn(3, 5, H, D, dtype=torch.float64)
    s = (q * k).sum(-1) / math.sqrt(D)
    got = (fm.phi_q(q) * fm.phi_k(k)).sum(-1)
    torch.testing.assert_close(got, 1 + s + s * s / 2)
    assert fm.feature_dim == 1 + D + D * (D + 1) // 2


def test_poly_kernel_matches_its_coefficients_with_projection():
    fm = build_feature_map("poly", {"degree": 4, "rank": 5}, D, H, HK).double()
    with torch.no_grad():
        fm.coeffs.copy_(torch.randn(H, 5))
        fm.proj.copy_(torch.randn(HK, D, 5))
    q, k = torch.randn(2, 3, H, D, dtype=torch.float64), torch.randn(2, 3, HK, D, dtype=torch.float64)
    qt, kt = fm.project_q(q), fm.project_k(k).repeat_interleave(H // HK, dim=2)
    s = (qt * kt).sum(-1)
    want = sum(fm.coeffs[:, i] * s**i for i in range(5))
    got = (fm.phi_q(q) * fm.phi_k(k).repeat_interleave(H // HK, dim=2)).sum(-1)
    torch.testing.assert_close(got, want)
    assert fm.feature_dim == sum(math.comb(5 + i - 1, i) for i in range(5))


def test_poly_defaults_equal_taylor():
    q, k = torch.randn(2, 4, H, D), torch.randn(2, 4, H, D)
    poly, taylor = build_feature_map("poly", {}, D, H, H), build_feature_map("taylor", {}, D, H, H)
    torch.testing.assert_close((poly.phi_q(q) * poly.phi_k(k)).sum(-1), (taylor.phi_q(q) * taylor.phi_k(k)).sum(-1))


def test_unknown_name_lists_registered():
    with pytest.raises(DistillError) as err:
        build_feature_map("nope", {}, D, H, HK)
    for name in FEATURE_MAPS:
        assert name in str(err.value)


def test_custom_map_from_module_path():
    fm = build_feature_map("custom_maps:SquarePlusOne", {"gain": 2.0}, D, H, HK)
    assert fm.feature_dim == D + 1
    assert fm.phi_q(torch.ones(1, 1, H, D))[0, 0, 0, 0] == 2.0


def test_bad_module_path_and_options():
    with pytest.raises(DistillError, match="cannot load feature map"):
        build_feature_map("no_such_module:Map", {}, D, H, HK)
    with pytest.raises(DistillError, match="does not take"):
        build_feature_map("elu", {"feature_dim": 3}, D, H, HK)
    with pytest.raises(DistillError, match="rank"):
        build_feature_map("poly", {"rank": D + 1}, D, H, HK)


def test_register_decorator_rejects_duplicates():
    @register_feature_map("test-identity-plus")
    class Mine(FeatureMap):
        def __init__(self, head_dim, num_heads, num_kv_heads):
            super().__init__(head_dim, num_heads, num_kv_heads)
            self.feature_dim = head_dim

        def phi_q(self, q):
            return torch.nn.functional.softplus(q)

        phi_k = phi_q

    try:
        assert build_feature_map("test-identity-plus", {}, D, H, HK).feature_dim == D
        with pytest.raises(ValueError, match="already registered"):
            register_feature_map("test-identity-plus")(Mine)
    finally:
        FEATURE_MAPS.pop("test-identity-plus")
