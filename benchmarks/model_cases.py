"""Teacher vs student on the demo model: decode latency, prefill throughput, state memory."""
from __future__ import annotations

import copy
import itertools
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from distill import ConvertConfig, convert_model, load_converted
from distill.models import load_model

from .runner import Context, Result, case, median_time, save_figure

DEMO_STUDENT = ConvertConfig(feature_map="hedgehog", window=64)


def teacher(ctx: Context):
    return ctx.memo("teacher", lambda: load_model("demo")[0])


def student(ctx: Context):
    def build():
        if ctx.student_dir:
            return load_converted(ctx.student_dir).eval()
        return convert_model(copy.deepcopy(teacher(ctx)), DEMO_STUDENT).eval()

    return ctx.memo("student", build)


def kv_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized)


@torch.no_grad()
def _greedy(model, ids, steps, use_cache):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1] :]


@torch.no_grad()
def _decode_latency(model, cache, context: int, steps: int) -> float:
    """Median seconds per generated token, continuing from a cache that holds ``context`` tokens."""
    token, times = torch.tensor([[42]]), []
    for i in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        logits = model(token, cache=cache, position_ids=torch.tensor([[context + i]]), use_cache=True).logits
        times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
    return statistics.median(times[1:])


def _teacher_cache(model, context: int, static_len: int = 0) -> DynamicCache | StaticCache:
    """A KV cache holding ``context`` tokens; values are random (latency does not depend on them).
    ``static_len`` > 0: a preallocated StaticCache of that many positions instead of the default
    DynamicCache (which concatenates, so copies the whole cache, at every step)."""
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=static_len) if static_len else DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(0)
    for i in range(cfg.num_hidden_layers):
        shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
        cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), i)
    return cache


@torch.no_grad()
def _student_cache(model, context: int):
    """A recurrent cache after a real 128-token prefill, advanced to position ``context``."""
    cache = model.new_cache()
    model(torch.randint(3, 1000, (1, 128), generator=torch.Generator().manual_seed(0)), cache=cache, use_cache=True)
    for layer in cache.layers:
        if hasattr(layer, "seen"):
            layer.seen = context
    return cache


@case("decode")
def decode(ctx: Context) -> Result:
    t, s = teacher(ctx), student(ctx)
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    for model in (t, s):  # correctness first: cached decoding equals uncached decoding
        if not torch.equal(_greedy(model, ids, 4, True), _greedy(model, ids, 4, False)):
            raise AssertionError(f"{type(model).__name__}: cached generate differs from uncached")
    with torch.no_grad():  # ... and the static-cache teacher's next-token logits equal the uncached ones
        static = StaticCache(config=t.config, max_cache_len=32)
        t(ids[:, :-1], cache=static, use_cache=True)
        step = t(ids[:, -1:], cache=static, position_ids=torch.tensor([[ids.shape[1] - 1]]), use_cache=True).logits
        if not torch.allclose(step[0, -1], t(ids, use_cache=False).logits[0, -1], atol=1e-4):
            raise AssertionError("teacher with a StaticCache differs from uncached")
    contexts = [512, 2048, 8192] if ctx.quick else [512, 2048, 8192, 32768]
    steps = 6 if ctx.quick else 12
    rows = []
    for context in contexts:
        tc, sc = _teacher_cache(t, context), _student_cache(s, context)
        t_ms = _decode_latency(t, tc, context, steps) * 1e3
        s_ms = _decode_latency(s, sc, context, steps) * 1e3
        static = _teacher_cache(t, context, static_len=context + steps + 1)
        ts_ms = _decode_latency(t, static, context, steps) * 1e3
        del static
        rows.append(
            {
                "context": context,
                "teacher_ms_per_token": t_ms,
                "student_ms_per_token": s_ms,
                "student/teacher": s_ms / t_ms,
                "teacher_static_ms_per_token": ts_ms,
                "student/teacher_static": s_ms / ts_ms,
                "teacher_kv_MB": kv_bytes(tc) / 2**20,
                "student_state_MB": sc.nbytes() / 2**20,
            }
        )
        del tc, sc

    def plot(out: Path) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        x = [r["context"] for r in rows]
        ax[0].plot(x, [r["teacher_ms_per_token"] for r in rows], "o-", label="teacher (KV cache)")
        ax[0].plot(x, [r["teacher_static_ms_per_token"] for r in rows], "o--", label="teacher (static KV cache)")
        ax[0].plot(x, [r["student_ms_per_token"] for r in rows], "o-", label="student (recurrent)")
        ax[0].set(xscale="log", xlabel="context tokens", ylabel="ms / token", title="decode latency")
        ax[1].plot(x, [r["teacher_kv_MB"] for r in rows], "o-", label="teacher KV cache")
        ax[1].plot(x, [r["student_state_MB"] for r in rows], "o-", label="student state")
        ax[1].set(xscale="log", yscale="log", xlabel="context tokens", ylabel="MiB", title="cache memory")
        for a in ax:
            a.legend()
        return save_figure(fig, out / "decode.png")

    return Result(
        rows,
        notes=[
            "Median per-token latency of batch-1 greedy decoding, teacher and student timed in the same process.",
            "The teacher's KV cache is filled with random keys/values of the given length (latency does not depend "
            "on their values); the student's state comes from a real prefill and is advanced to the same position.",
            "teacher = Hugging Face's default DynamicCache (what generate() uses; it concatenates, i.e. copies the "
            "whole KV cache, at every step); teacher_static = a preallocated StaticCache (no copy, attention over "
            "the whole buffer with a mask), the stronger baseline.",
            f"Student: {ctx.student_dir or DEMO_STUDENT}; torch threads {torch.get_num_threads()}.",
        ],
        plots=[plot],
    )


@case("prefill")
def prefill(ctx: Context) -> Result:
    t, s = teacher(ctx), student(ctx)
    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # correctness first: the student's teacher mode is the teacher
        if not torch.allclose(s(ids, distill_mode="teacher").logits, t(ids, use_cache=False).logits, atol=1e-3):
            raise AssertionError("student in teacher mode does not reproduce the teacher")
    lengths = [512, 2048] if ctx.quick else [512, 2048, 8192]
    rows = []
    for n in lengths:
        x = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            t_s = median_time(lambda: t(x, use_cache=True, logits_to_keep=1), repeats=3)
            s_s = median_time(lambda: s(x, use_cache=True, logits_to_keep=1), repeats=3)
        rows.append({"tokens": n, "teacher_tok_per_s": n / t_s, "student_tok_per_s": n / s_s, "student/teacher time": s_s / t_s})

    def plot(out: Path) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = [r["tokens"] for r in rows]
        ax.plot(x, [r["teacher_tok_per_s"] for r in rows], "o-", label="teacher")
        ax.plot(x, [r["student_tok_per_s"] for r in rows], "o-", label="student")
        ax.set(xscale="log", xlabel="prompt tokens", ylabel="tokens / s", title="prefill throughput")
        ax.legend()
        return save_figure(fig, out / "prefill.png")

    return Result(rows, notes=["Median of 3 prefills (batch 1, cache built, last logits only), same process."], plots=[plot])


def _state_bytes_formula(cfg: ConvertConfig, config, feature_dim: int, stack_feature_dim: int, dtype_bytes: int) -> int:
    """Bytes of one layer's recurrent cache: fp32 states [Hk,F,D+1] (+ [H,F',D+1] per extra
    sublayer) plus the window's keys and values (model dtype) and validity flags."""
    D, H, Hk = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    total = Hk * feature_dim * (D + 1) * 4 + (cfg.depth - 1) * H * stack_feature_dim * (D + 1) * 4
    return total + cfg.window * (2 * Hk * D * dtype_bytes + 1)


@case("memory")
def memory(ctx: Context) -> Result:
    config = copy.deepcopy(teacher(ctx).config)
    config.num_hidden_layers = 1
    layers = teacher(ctx).config.num_hidden_layers
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * 4 * layers  # fp32 KV cache, all layers
    maps = [("elu", {}), ("hedgehog", {}), ("t2r", {}), ("taylor", {}), ("poly", {"rank": 16}), ("poly", {"rank": 32})]
    rows = []
    for (name, kwargs), depth, window in itertools.product(maps, [1, 2, 3], [0, 64]):
        cfg = ConvertConfig(feature_map=name, feature_map_kwargs=kwargs, depth=depth, window=window)
        torch.manual_seed(0)
        model = convert_model(AutoModelForCausalLM.from_config(config), cfg).eval()
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(3, 1000, (1, 80)), cache=cache, use_cache=True)
        attn = model.model.layers[0].self_attn
        fdim = attn.rnn.feature_map.feature_dim
        sdim = attn.stack[0].rnn.feature_map.feature_dim if depth > 1 else 0
        formula = _state_bytes_formula(cfg, config, fdim, sdim, 4)
        measured = cache.nbytes()
        if measured != formula:  # correctness: the formula is what the cache holds
            raise AssertionError(f"{name} depth {depth} window {window}: measured {measured} B, formula {formula} B")
        state = measured * layers
        rows.append(
            {
                "feature_map": name + (f"(r={kwargs['rank']})" if kwargs else ""),
                "F": fdim,
                "depth": depth,
                "window": window,
                "state_MB": state / 2**20,
                "kv_cache_MB_at_8k": kv_per_token * 8192 / 2**20,
                "crossover_tokens": round(state / kv_per_token),
            }
        )

    def plot(out: Path) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        ctxs = [2**i for i in range(6, 17)]
        ax.plot(ctxs, [kv_per_token * c / 2**20 for c in ctxs], "k-", lw=2, label="teacher KV cache (fp32)")
        names = list(dict.fromkeys(r["feature_map"] for r in rows))
        for r in rows:
            if r["depth"] == 1:
                color = f"C{names.index(r['feature_map'])}"
                ax.axhline(r["state_MB"], color=color, ls="--" if r["window"] else "-", lw=1, label=f"{r['feature_map']} w={r['window']}")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="MiB (all layers)", title="state vs KV cache")
        ax.legend(fontsize=6, ncol=2)
        return save_figure(fig, out / "memory.png")

    return Result(
        rows,
        notes=[
            f"Demo model geometry: {layers} layers, {config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, "
            f"head_dim {config.head_dim}; KV cache {kv_per_token} B/token (fp32).",
            "state_MB is measured from the cache tensors after a prefill and checked against the formula "
            "Hk·F·(D+1)·4 + (depth−1)·H·F'·(D+1)·4 + window·(2·Hk·D·4 + 1) bytes per layer.",
            "crossover_tokens: context length at which the teacher's KV cache becomes larger than the student's state.",
        ],
        plots=[plot],
    )


def _speed_sizes(quick: bool) -> tuple[int, int]:
    """(prefill tokens, decode steps per turn) of :func:`_speed_rows`."""
    return (512, 2) if quick else (2048, 8)


def _speed_note(quick: bool) -> str:
    n, steps = _speed_sizes(quick)
    return (
        f"Timed in turns (a warm-up round, then 5 rounds of {steps} decode steps and one prefill per student); "
        f"decode: median ms per token from position 8192 after a 128-token prefill; prefill: median of the 5 passes over {n} tokens"
    )


def _speed_rows(students: dict, quick: bool, rounds: int = 5) -> list[dict]:
    """Decode step at position 8192, prefill of 2048 tokens (512 if ``quick``) and state for each
    student in ``students`` (label -> model), after checking cached generate = uncached for each.
    The students are timed in turns, ``rounds`` times over (a few decode steps and one prefill each
    per turn, :func:`_speed_sizes`), and each figure is the median of its turns: a slow spell of
    the machine falls on every student alike, so the ratios between them hold where figures taken
    one student after another drift."""
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    for label, s in students.items():
        if not torch.equal(_greedy(s, ids, 4, True), _greedy(s, ids, 4, False)):
            raise AssertionError(f"{label}: cached generate differs from uncached")
    n, steps = _speed_sizes(quick)
    x = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(n))
    caches = {label: _student_cache(s, 8192) for label, s in students.items()}
    decode = {label: [] for label in students}
    prefill = {label: [] for label in students}
    with torch.no_grad():
        for turn in range(rounds + 1):  # the first round is a warm-up
            for label, s in students.items():
                step = _decode_latency(s, caches[label], 8192 + turn * (steps + 1), steps)
                start = time.perf_counter()
                s(x, use_cache=True, logits_to_keep=1)
                prefill_s = time.perf_counter() - start
                if turn:
                    decode[label].append(step)
                    prefill[label].append(prefill_s)
    return [
        {
            "decode_ms_per_token": statistics.median(decode[label]) * 1e3,
            "prefill_tok_per_s": n / statistics.median(prefill[label]),
            "state_MB": caches[label].nbytes() / 2**20,
        }
        for label in students
    ]


def _with_gates(model, strength: float):
    """``model`` with every ``gate_strength`` set to ``strength``: untrained gates are shut (0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate_strength"):
                p.fill_(strength)
    return model


# About the strongest gate of the trained demo gla student (0.284); 5 pushes the GLA gates past
# distill_kernels.gated.FACTORED_SPREAD, so chunk_gla takes its sub-chunked form.
TRAINED_GATE, STRONG_GATE = 0.3, 5.0


@case("recurrences")
def recurrences(ctx: Context) -> Result:
    """Decode step and prefill of the demo student's architecture under every registered
    recurrence, side by side in one process, as ratios to ``linear`` (issue: ≤ 1.2x); and ``gla``
    with gates strong enough for chunk_gla's sub-chunked form."""
    from distill.recurrence import RECURRENCES

    t = teacher(ctx)
    names = sorted(RECURRENCES, key=lambda r: (r != "linear", r))
    cases = [(name, name, TRAINED_GATE) for name in names] + [("gla, strong gates", "gla", STRONG_GATE)]
    students = {
        label: _with_gates(
            convert_model(copy.deepcopy(t), ConvertConfig(feature_map="hedgehog", window=64, recurrence=name)), strength
        ).eval()
        for label, name, strength in cases
    }
    rows = [{"recurrence": label, **row} for label, row in zip(students, _speed_rows(students, ctx.quick))]
    del students
    base = rows[0]
    for r in rows:
        r["decode/linear"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]
        r["prefill_time/linear"] = base["prefill_tok_per_s"] / r["prefill_tok_per_s"]
    return Result(
        rows,
        notes=[
            f"Demo model, hedgehog + 64-token window, every gate_strength {TRAINED_GATE} (about the trained demo gla "
            f"student's strongest); 'gla, strong gates': {STRONG_GATE}, past chunk_gla's factored limit.",
            f"{_speed_note(ctx.quick)}; torch threads {torch.get_num_threads()}; the CPU path of every recurrence (torch kernels).",
        ],
    )


@case("sparse_cache")
def sparse_cache(ctx: Context) -> Result:
    """Decode step, prefill and state of the demo student's architecture with a sparse global cache
    of M keys per kv head (LoLA), side by side in one process, as ratios to M = 0."""
    from distill.convert import set_sparse_cache

    s = convert_model(copy.deepcopy(teacher(ctx)), DEMO_STUDENT).eval()
    sizes = (0, 64, 256, 512, 768)
    students = {}
    for keys in sizes:
        students[keys] = copy.deepcopy(s)
        set_sparse_cache(students[keys], keys)
    rows = [{"sparse_cache": keys, **row} for keys, row in zip(sizes, _speed_rows(students, ctx.quick))]
    for r in rows:
        r["decode/plain"] = r["decode_ms_per_token"] / rows[0]["decode_ms_per_token"]
        r["prefill_time/plain"] = rows[0]["prefill_tok_per_s"] / r["prefill_tok_per_s"]
    return Result(
        rows,
        notes=[
            "Demo model, hedgehog + 64-token window; M keys per kv head kept exact (0 = the plain hybrid).",
            f"{_speed_note(ctx.quick)}; torch threads {torch.get_num_threads()}. State: recurrent state, window and sparse cache.",
        ],
    )
