"""Conversion, the two forms, generate() and save/load on tiny random models."""
import itertools

import pytest
import torch
from conftest import (
    CONFIGS,
    VOCAB,
    assert_left_padded_batch_equals_one_by_one,
    greedy_uncached,
    perturb_new_parameters,
    stepwise_logits,
    tiny_model,
)
from transformers import AutoModelForCausalLM, GPT2Config

import distill
from distill import ConvertConfig, convert_model, load_converted
from distill.errors import DistillError
from distill.feature_maps import FEATURE_MAPS
from distill.layer import LinearAttention

MAPS = sorted(FEATURE_MAPS)  # every registered map joins the grids below


def student(arch="llama", perturb=True, **cfg):
    model = convert_model(tiny_model(arch), ConvertConfig(**cfg))
    if perturb:
        perturb_new_parameters(model)
    return model


GRID = list(itertools.product(MAPS, [1, 2, 3], [0, 4], ["none", "fixed", "learned"]))


@pytest.mark.parametrize("fmap,depth,window,decay", GRID)
def test_parallel_equals_recurrent(fmap, depth, window, decay, tokens):
    model = student(feature_map=fmap, depth=depth, window=window, decay=decay)
    with torch.no_grad():
        parallel = model(tokens, use_cache=False, distill_mode="parallel").logits
        recurrent = stepwise_logits(model, tokens)
        forced = model(tokens, use_cache=False, distill_mode="recurrent").logits
    torch.testing.assert_close(recurrent, parallel, atol=1e-4, rtol=0)
    torch.testing.assert_close(forced, parallel, atol=1e-4, rtol=0)


# Past the 64-token chunk of the scans and the 256-query block of the windowed softmax, so that
# state carried across chunks and window keys carried across query blocks are both exercised.
LONG_T = 300
LONG_GRID = list(itertools.product(MAPS, [1, 2], [0, 64]))


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(3, VOCAB, (2, LONG_T), generator=torch.Generator().manual_seed(321))


def long_student(fmap, depth, window):
    teacher = tiny_model(max_position_embeddings=512)
    model = convert_model(teacher, ConvertConfig(feature_map=fmap, depth=depth, window=window, decay="learned"))
    perturb_new_parameters(model)
    return model


def test_long_grid_is_long_enough():
    from distill.softmax import QUERY_BLOCK

    assert LONG_T > QUERY_BLOCK and LONG_T > 64


@pytest.mark.parametrize("fmap,depth,window", LONG_GRID)
def test_parallel_equals_recurrent_past_a_chunk_and_a_query_block(fmap, depth, window, long_tokens):
    model = long_student(fmap, depth, window)
    with torch.no_grad():
        parallel = model(long_tokens, use_cache=False, distill_mode="parallel").logits
        recurrent = stepwise_logits(model, long_tokens)
    torch.testing.assert_close(recurrent, parallel, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmap,depth,window", LONG_GRID)
def test_prefill_decode_and_generate_past_a_chunk_and_a_query_block(fmap, depth, window, long_tokens):
    """Prefill 270 tokens (five chunks, two query blocks), prefill 20 more, decode the last 10:
    equals one pass. Then cached greedy generation from a 290-token prompt equals uncached."""
    model = long_student(fmap, depth, window)
    with torch.no_grad():
        full = model(long_tokens, use_cache=False).logits
        cache = model.new_cache()
        pieces = [model(long_tokens[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 270), (270, 290))]
        pieces += [model(long_tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(290, LONG_T)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)
        assert cache.get_seq_length() == LONG_T

        prompt = long_tokens[:1, :290]
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        assert cached.shape[1] > prompt.shape[1]
        seq = greedy_uncached(model, prompt, cached.shape[1] - prompt.shape[1])  # stops where EOS stopped it
    assert torch.equal(cached, seq)


def test_chunked_prefill_then_decode_equals_parallel(tokens):
    """A prompt processed in two chunks (cache carried) equals one pass, with window and decay."""
    model = student(feature_map="hedgehog", depth=2, window=4, decay="learned")
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache = model.new_cache()
        a = model(tokens[:, :13], cache=cache, use_cache=True).logits
        b = model(tokens[:, 13:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == tokens.shape[1]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_architecture_converts(arch, tokens):
    teacher = tiny_model(arch)
    with torch.no_grad():
        reference = teacher(tokens, use_cache=False).logits
    model = convert_model(teacher, ConvertConfig(feature_map="hedgehog", depth=2, window=4))
    assert sum(isinstance(m, LinearAttention) for m in model.modules()) == 2
    perturb_new_parameters(model)
    with torch.no_grad():
        # teacher mode reproduces the original softmax model from the shared weights
        torch.testing.assert_close(model(tokens, distill_mode="teacher").logits, reference, atol=1e-5, rtol=0)
        parallel = model(tokens, use_cache=False).logits
        torch.testing.assert_close(stepwise_logits(model, tokens), parallel, atol=1e-4, rtol=0)
        assert not torch.allclose(parallel, reference, atol=1e-3)


def test_weights_are_shared_not_copied():
    teacher = tiny_model()
    q = teacher.model.layers[0].self_attn.q_proj.weight
    model = convert_model(teacher, ConvertConfig())
    assert model.model.layers[0].self_attn.q_proj.weight is q


def test_deeper_stack_starts_identical_to_depth_one(tokens):
    with torch.no_grad():
        one = student(perturb=False, depth=1, window=4)(tokens, use_cache=False).logits
        three = student(perturb=False, depth=3, window=4)(tokens, use_cache=False).logits
    assert torch.equal(one, three)


def test_keep_softmax_layers(tokens):
    teacher = tiny_model()
    model = convert_model(teacher, ConvertConfig(feature_map="elu", keep_softmax_layers=[1]))
    assert isinstance(model.model.layers[0].self_attn, LinearAttention)
    assert not isinstance(model.model.layers[1].self_attn, LinearAttention)
    with torch.no_grad():
        torch.testing.assert_close(stepwise_logits(model, tokens), model(tokens, use_cache=False).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [0, 4])
def test_cached_generate_equals_uncached_greedy(window, tokens):
    model = student(feature_map="hedgehog", depth=2, window=window, decay="learned")
    prompt = tokens[:1, :9]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        seq = greedy_uncached(model, prompt, 12)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("window", [0, 4])
def test_left_padded_batch_equals_one_by_one(window):
    model = student(feature_map="hedgehog", depth=2, window=window, decay="fixed")
    assert_left_padded_batch_equals_one_by_one(model, max_new_tokens=8)


def test_beam_search_and_sampling_run_on_the_cache(tokens):
    model = student(feature_map="elu", depth=2, window=4)
    prompt = tokens[:1, :6]
    with torch.no_grad():
        beams = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        beams_uncached = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False, pad_token_id=0)
        torch.manual_seed(0)
        sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
        torch.manual_seed(0)
        sampled_again = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
    assert torch.equal(beams, beams_uncached)
    assert torch.equal(sampled, sampled_again) and sampled.shape == (1, 12)


def test_state_size_does_not_grow_with_context(tokens):
    model = student(feature_map="hedgehog", window=4)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :5], cache=cache, use_cache=True)
        size = cache.nbytes()
        model(tokens[:, 5:], cache=cache, use_cache=True)
        for t in range(6):
            model(tokens[:, t : t + 1], cache=cache, use_cache=True)
    assert cache.nbytes() == size > 0


def test_save_load_round_trip_is_exact(tmp_path, tokens):
    model = student(feature_map="poly", feature_map_kwargs={"rank": 8}, depth=2, window=4, decay="learned")
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = model.state_dict()
    for loaded in (again, auto):
        after = loaded.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        with torch.no_grad():
            assert torch.equal(loaded(tokens, use_cache=False).logits, model(tokens, use_cache=False).logits)
    assert again.distill_config == model.distill_config


def test_custom_map_survives_save_load(tmp_path, tokens):
    model = student(feature_map="custom_maps:SquarePlusOne", feature_map_kwargs={"gain": 0.5})
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(load_converted(tmp_path)(tokens, use_cache=False).logits, model(tokens, use_cache=False).logits)


def test_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    student(feature_map="hedgehog").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "feature_map" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DistillError, match="missing"):
        load_converted(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DistillError):
        load_converted(tmp_path)
    with pytest.raises(DistillError, match="no config.json"):
        load_converted(tmp_path / "nowhere")


def test_unsupported_architecture_is_named():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(DistillError) as err:
        convert_model(model, ConvertConfig())
    assert "gpt2" in str(err.value) and "llama" in str(err.value) and "qwen3" in str(err.value)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"depth": 0}, "depth"),
        ({"window": -1}, "window"),
        ({"decay": "sometimes"}, "decay"),
        ({"keep_softmax_layers": [5]}, "keep_softmax_layers"),
        ({"feature_map": "poly", "feature_map_kwargs": {"rank": 64}}, "rank"),
        ({"feature_map": "nope"}, "registered"),
        ({"bogus": 1}, "unknown config key bogus"),
    ],
)
def test_bad_config_leaves_model_untouched(cfg, match):
    model = tiny_model()
    before_class = type(model)
    attn = [layer.self_attn for layer in model.model.layers]
    with pytest.raises(DistillError, match=match):
        convert_model(model, cfg)
    assert type(model) is before_class and model.config.model_type == "llama"
    assert [layer.self_attn for layer in model.model.layers] == attn


def test_convert_twice_is_refused():
    model = student()
    with pytest.raises(DistillError, match="already converted"):
        convert_model(model, ConvertConfig())


def test_registered_names_cover_builtins():
    assert {"elu", "relu", "t2r", "hedgehog", "taylor", "poly"} <= set(FEATURE_MAPS)
    assert distill.register_feature_map is not None
