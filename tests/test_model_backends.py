"""A whole converted model through the Triton kernels (interpreted on CPU) equals the torch backend."""
import pytest
import torch
from conftest import perturb_new_parameters, tiny_model

from distill import ConvertConfig, convert_model

CASES = [
    dict(feature_map="elu", decay="fixed"),
    dict(feature_map="poly", feature_map_kwargs={"rank": 8}, decay="learned", depth=2),
    dict(feature_map="hedgehog", window=4),
]


def run(model, tokens):
    model.zero_grad()
    logits = model(tokens, use_cache=False).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        generated = model.generate(tokens[:1, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    return logits.detach(), grads, generated


@pytest.mark.parametrize("cfg", CASES, ids=[c["feature_map"] for c in CASES])
def test_triton_backend_matches_torch(cfg, tokens, monkeypatch):
    model = convert_model(tiny_model(), ConvertConfig(**cfg))
    perturb_new_parameters(model)
    tokens = tokens[:, :17]
    monkeypatch.setenv("DISTILL_BACKEND", "torch")
    ref_logits, ref_grads, ref_gen = run(model, tokens)
    monkeypatch.setenv("DISTILL_BACKEND", "triton")
    logits, grads, gen = run(model, tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)
    assert torch.equal(gen, ref_gen)
