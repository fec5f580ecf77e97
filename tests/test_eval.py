"""``distill eval``: lm-eval numbers against hand computations, batch invariance, cached decoding,
the shipped offline task configs, and one-line errors for bad input.

Everything runs offline on tiny random models built here: a 2-layer Llama over a byte-level
tokenizer (256 bytes + ``<eos>``), and its conversion to linear attention.
"""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill import ConvertConfig, convert_model
from distill.cache import RecurrentCache
from distill.cli import main
from distill.errors import DistillError
from distill.eval import runner
from distill.eval import tasks as eval_tasks

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Linear attention keeps a fixed-size state, so decoding costs the same at every step.",
    "Short one.",
    "A longer line of text that is split into several rolling windows when the context is small, "
    "which is exactly what lm-eval does for perplexity.",
]
MC_DOCS = [
    {"question": "Two plus two is", "choices": ["four", "five", "a fish"], "label": 0},
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "Water boils at a temperature of", "choices": ["100 C", "10 C", "1 C", "0 C"], "label": 0},
    {"question": "Cats say", "choices": ["meow", "woof", "moo"], "label": 0},
    {"question": "A week has this many days:", "choices": ["seven", "three"], "label": 0},
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)  # 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=256, pad_token_id=256,
        initializer_range=0.2,  # spread-out logits, so greedy decoding has no near-ties
    )
    return LlamaForCausalLM(config).eval()


def tiny_student(seed: int = 0, window: int = 0):
    return convert_model(tiny_llama(seed), ConvertConfig(feature_map="elu", depth=1, window=window)).eval()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """lm-eval YAMLs for a tiny perplexity task and a tiny multiple-choice task, data in Python."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "tinydata.py").write_text(textwrap.dedent(f"""
        from datasets import Dataset, DatasetDict
        def texts(**_):
            return DatasetDict({{"test": Dataset.from_dict({{"text": {TEXTS!r}}})}})
        def mc(**_):
            return DatasetDict({{"test": Dataset.from_list({MC_DOCS!r})}})
    """))
    (root / "tiny_ppl.yaml").write_text(textwrap.dedent("""
        task: tiny_ppl
        custom_dataset: !function tinydata.texts
        output_type: loglikelihood_rolling
        test_split: test
        doc_to_text: ""
        doc_to_target: text
        metric_list:
          - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
          - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
          - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
    """))
    (root / "tiny_mc.yaml").write_text(textwrap.dedent("""
        task: tiny_mc
        custom_dataset: !function tinydata.mc
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{question}}"
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - {metric: acc, aggregation: mean, higher_is_better: true}
          - {metric: acc_norm, aggregation: mean, higher_is_better: true}
    """))
    (root / "tiny_group.yaml").write_text(textwrap.dedent("""
        group: tiny_group
        task: [tiny_mc]
        aggregate_metric_list:
          - {metric: acc, aggregation: mean, weight_by_size: true}
    """))
    return root


@pytest.fixture(scope="module")
def manager(task_dir):
    return runner._manager(str(task_dir))  # the same cached TaskManager the CLI tests get


def hand_loglikelihood(model, tok, text: str, max_length: int) -> float:
    """Sum of log p(token | previous tokens), the context cut to ``max_length`` tokens.

    Tokens are scored in chunks of ``max_length``; each chunk sees the ``max_length`` tokens before
    its last target. The sequence starts with the tokenizer's EOS, as lm-eval does without a BOS.
    """
    seq = [tok.eos_token_id] + tok(text)["input_ids"]
    n, total = len(seq) - 1, 0.0
    for start in range(0, n, max_length):
        end = min(start + max_length, n)
        window = torch.tensor([seq[max(0, end - max_length):end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window, use_cache=False).logits[0].double(), dim=-1)
        targets = torch.tensor(seq[start + 1:end + 1])
        total += logp[-(end - start):].gather(1, targets[:, None]).sum().item()
    return total


@pytest.mark.parametrize("make", [tiny_llama, tiny_student], ids=["teacher", "student"])
@pytest.mark.parametrize("max_length", [256, 16], ids=["one-window", "rolling"])
def test_perplexity_matches_hand_computation(manager, make, max_length):
    model, tok = make(), tiny_tokenizer()
    res = runner.evaluate_model(model, tok, ["tiny_ppl"], manager=manager, batch_size=2, max_length=max_length)
    got = runner.task_metrics(res, "tiny_ppl")
    ll = sum(hand_loglikelihood(model, tok, t, max_length) for t in TEXTS)
    words = sum(len(t.split()) for t in TEXTS)
    nbytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / nbytes), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-5)


def test_batch_size_does_not_change_results(manager):
    model, tok = tiny_student(), tiny_tokenizer()
    runs = [
        runner.evaluate_model(model, tok, ["tiny_mc", "tiny_ppl"], manager=manager, batch_size=bs, max_length=32)
        for bs in (1, 3)
    ]
    for task in ("tiny_mc", "tiny_ppl"):
        one, three = (runner.task_metrics(r, task) for r in runs)
        assert one.keys() == three.keys() and one
        for metric in one:
            assert three[metric] == pytest.approx(one[metric], rel=1e-5), (task, metric)


def test_generate_until_uses_recurrent_cache_and_matches_uncached():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_student(), tiny_tokenizer()
    steps = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        steps.append((ids.shape[1], kwargs.get("cache", kwargs.get("past_key_values"))))

    model.register_forward_pre_hook(record, with_kwargs=True)
    contexts = ["Once upon a time", "Hi", "The state of a linear RNN"]
    gen = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=64)  # batches are left-padded
    requests = [Instance("generate_until", {}, (c, dict(gen)), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert any(n == 1 and isinstance(cache, RecurrentCache) for n, cache in steps), "decoding did not use the cache"

    for context, text in zip(contexts, got):
        ids = tok(context)["input_ids"]
        for _ in range(gen["max_gen_toks"]):  # uncached greedy decoding, one full forward per token
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            if ids[-1] == tok.eos_token_id:
                break
        want = tok.decode(ids[len(tok(context)["input_ids"]):], skip_special_tokens=True).split("\n\n")[0]
        assert text == want


def hybrid_student(seed: int = 0):
    """Depth-2 hedgehog stack with a 4-token softmax window: every part of the recurrent cache."""
    return convert_model(tiny_llama(seed), ConvertConfig(feature_map="hedgehog", depth=2, window=4)).eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_student, hybrid_student], ids=["teacher", "student", "hybrid"])
def test_shared_context_loglikelihood_equals_lm_eval(make):
    """One context run for all its choices gives lm-eval's own log-probabilities and greedy flags."""
    from lm_eval.models.huggingface import HFLM

    from distill.eval.shared_prefix import SharedPrefixLM

    model, tok = make(), tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    requests = []
    # (context length, continuation lengths): three shared groups of different lengths (one
    # left-padded batch of two, then one), then a one-token context, a lone request and an
    # over-long group, which take lm-eval's own path
    for n_ctx, conts in [(20, [1, 3, 5]), (9, [2, 2, 4]), (3, [1, 4]), (1, [2, 3]), (30, [2]), (45, [6, 1])]:
        ctx = torch.randint(0, 256, (n_ctx,), generator=g).tolist()
        for n in conts:
            requests.append(((f"ctx{n_ctx}", f"cont{n}"), ctx, torch.randint(0, 256, (n,), generator=g).tolist()))
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=48)
    shared = SharedPrefixLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=48)
    batches = []
    score = shared._score_groups
    shared._score_groups = lambda groups: batches.append([len(c) for _, c in groups]) or score(groups)

    want = plain._loglikelihood_tokens(requests, disable_tqdm=True)
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert batches == [[3, 3], [2]]
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-5, abs=1e-4)


def test_recovery_and_relative_scores():
    ppl = runner.Row("t", "word_perplexity", student=20.0, teacher=10.0, higher_is_better=False)
    acc = runner.Row("t", "acc", student=0.4, teacher=0.5, chance=0.25)
    assert ppl.recovery == pytest.approx(50.0) and ppl.relative is None
    assert acc.recovery == pytest.approx(80.0) and acc.relative == pytest.approx(60.0)
    assert runner.Row("t", "acc", student=0.4).recovery is None


def test_shipped_offline_tasks_load(manager, tmp_path, monkeypatch):
    """Every YAML in distill/eval/task_configs is indexed and builds, here on fake cached data."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    bb = eval_tasks.bigbench_dir()
    bb.mkdir()
    example = {"input": "Pick one. ", "target_scores": {"yes ": 0, "no": 1, "maybe": 0}}
    for name in eval_tasks.BIGBENCH_TASKS:
        (bb / f"{name}.json").write_text(json.dumps({"examples": [example] * 3}))
    summaries = {str(i): {"title": f"T{i:02d}", "extract": f"Text number {i}."} for i in range(20)}
    (tmp_path / "summaries_en-us.json").write_text(json.dumps(summaries))

    shipped = sorted(p.stem for p in eval_tasks.TASKS_DIR.glob("*.yaml"))
    suites = [eval_tasks.SUITES[name].headline for name in ("offline", "long")]
    assert shipped == sorted(t for suite in suites for t in suite if t not in eval_tasks.DIRECT_TASKS)
    plan = eval_tasks.resolve_tasks("offline", manager)
    assert plan.needs_hub == []
    objects = eval_tasks.load_tasks(plan, manager)
    assert [o.task_name for o in objects] == plan.names
    docs = {o.task_name: list(o.eval_docs) for o in objects}
    assert len(docs["wiki_heldout_ppl"]) == 2  # titles T00 and T10
    mc = next(o for o in objects if o.task_name == "bigbench_social_iqa")
    doc = docs["bigbench_social_iqa"][0]
    assert mc.doc_to_text(doc) == "Q: Pick one.\nA:"
    assert mc.doc_to_choice(doc) == ["yes", "no", "maybe"] and mc.doc_to_target(doc) == 1
    assert eval_tasks.chance_levels(objects)["bigbench_social_iqa"] == pytest.approx(1 / 3)


def test_groups_expand_with_fewshot_and_chance(manager):
    plan = eval_tasks.resolve_tasks("tiny_group", manager)
    plan.num_fewshot["tiny_group"] = 2
    (group,) = eval_tasks.load_tasks(plan, manager)
    assert [t.get_config("num_fewshot") for t in group.get_all_tasks()] == [2]
    chance = eval_tasks.chance_levels([group], limit=2)
    assert chance["tiny_group"] == chance["tiny_mc"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_unknown_task_lists_close_matches(manager):
    with pytest.raises(DistillError, match="arc_easy"):
        eval_tasks.resolve_tasks("arc_easi", manager)
    with pytest.raises(DistillError, match="offline"):
        eval_tasks.resolve_tasks("tiny_mc,ofline", manager)


def _cli(args, capsys):
    code = main(["eval", *args])
    return code, capsys.readouterr().err


def test_cli_unknown_task_exits_2(task_dir, tmp_path, capsys):
    code, err = _cli(["x", "--tasks", "hellaswg", "--include-path", str(task_dir), "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "hellaswag" in err and "Traceback" not in err


def test_cli_builtin_task_offline_is_one_line(task_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_tasks, "hub_reachable", lambda timeout=3.0: False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    code, err = _cli(["x", "--tasks", "piqa", "--include-path", str(task_dir), "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert len(lines) == 1 and "Hugging Face hub" in lines[0] and "--tasks offline" in lines[0]


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt"])
def test_cli_bad_model_folder_exits_2(task_dir, tmp_path, capsys, kind):
    folder = tmp_path / "model"
    if kind != "missing":
        folder.mkdir()
    if kind == "corrupt":
        (folder / "config.json").write_text("{not json")
    args = [str(folder), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--out", str(tmp_path / "r.json")]
    code, err = _cli(args, capsys)
    assert code == 2 and str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_cli_teacher_vs_student_report(task_dir, tmp_path, capsys):
    tok = tiny_tokenizer()
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_llama().save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    tiny_student().save_pretrained(student_dir, tokenizer=tok)
    out = tmp_path / "report.json"
    args = [str(student_dir), "--teacher", str(teacher_dir), "--tasks", "tiny_mc,tiny_ppl", "--include-path",
            str(task_dir), "--batch-size", "2", "--max-length", "64", "--out", str(out)]
    code, err = _cli(args, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["tasks"] == ["tiny_mc", "tiny_ppl"]
    assert {"tiny_mc", "tiny_ppl"} <= report["lm_eval"]["student"]["results"].keys()
    assert {"tiny_mc", "tiny_ppl"} <= report["lm_eval"]["teacher"]["results"].keys()
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    assert rows["tiny_mc", "acc"]["relative"] is not None or rows["tiny_mc", "acc"]["teacher"] == rows["tiny_mc", "acc"]["chance"]
    ppl = rows["tiny_ppl", "word_perplexity"]
    assert ppl["recovery"] == pytest.approx(100 * ppl["teacher"] / ppl["student"])
    assert report["chance"]["tiny_mc"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4 + 1 / 3 + 1 / 2) / 5)
    table = out.with_suffix(".md").read_text()
    assert "| task | metric | teacher | student | recovery % | relative % |" in table
    assert report["summary"] in table and "recovers" in report["summary"]
    assert not list(tmp_path.glob(".report*"))  # no temporary files left behind


def test_dtype_applies_to_both_models(task_dir):
    """--dtype bfloat16 casts teacher and student; perplexities stay close to float32's."""
    loaded = []

    def loader(spec, dtype=None):
        model = tiny_llama() if spec == "teacher" else tiny_student()
        loaded.append(model)
        return model, tiny_tokenizer()

    ppl = {}
    for dtype in ("float32", "bfloat16"):
        report = runner.run({"student": "student", "teacher": "teacher"}, "tiny_ppl", include_path=str(task_dir),
                            max_length=64, dtype=dtype, loader=loader)
        ppl[dtype] = {r["metric"]: (r["teacher"], r["student"]) for r in report["rows"]}
        assert report["settings"]["dtype"] == dtype
    assert [next(m.parameters()).dtype for m in loaded] == [torch.float32] * 2 + [torch.bfloat16] * 2
    (t32, s32), (t16, s16) = ppl["float32"]["word_perplexity"], ppl["bfloat16"]["word_perplexity"]
    assert t16 == pytest.approx(t32, rel=0.05) and s16 == pytest.approx(s32, rel=0.05)


def test_reuse_takes_scored_models_from_earlier_reports(task_dir, tmp_path):
    """Teacher and student scored in two runs, then compared without evaluating anything again."""
    def loader(spec, dtype=None):
        return (tiny_llama() if spec == "teacher" else tiny_student()), tiny_tokenizer()

    common = dict(include_path=str(task_dir), max_length=64, loader=loader)
    paths = {"teacher": tmp_path / "teacher.json"}
    runner.write_report(runner.run({"student": "teacher"}, "tiny_mc,tiny_ppl", **common), paths["teacher"])
    for task in ("tiny_mc", "tiny_ppl"):  # the student's tasks in two runs, merged below
        paths[task] = tmp_path / f"student_{task}.json"
        runner.write_report(runner.run({"student": "student"}, task, **common), paths[task])

    def no_loading(spec, dtype=None):
        raise AssertionError(f"{spec} was evaluated again")

    both = runner.run({"student": "student", "teacher": "teacher"}, "tiny_mc,tiny_ppl", include_path=str(task_dir),
                      max_length=64, reuse=list(paths.values()), loader=no_loading)
    direct = runner.run({"student": "student", "teacher": "teacher"}, "tiny_mc,tiny_ppl", **common)
    assert both["reused"] == {"teacher": [str(paths["teacher"])], "student": [str(paths["tiny_mc"]), str(paths["tiny_ppl"])]}
    assert [(r["task"], r["metric"]) for r in both["rows"]] == [(r["task"], r["metric"]) for r in direct["rows"]]
    for got, want in zip(both["rows"], direct["rows"]):
        assert (got["teacher"], got["student"]) == pytest.approx((want["teacher"], want["student"]), rel=1e-6)

    with pytest.raises(DistillError, match="other tasks or settings"):  # a different limit is not reused
        runner.run({"student": "student"}, "tiny_mc,tiny_ppl", limit=2, reuse=[paths["tiny_mc"]], **common)
    with pytest.raises(DistillError, match="do not cover tiny_ppl"):
        runner.run({"student": "student"}, "tiny_mc,tiny_ppl", reuse=[paths["tiny_mc"]], **common)
    with pytest.raises(DistillError, match="not other"):
        runner.run({"student": "other"}, "tiny_mc,tiny_ppl", reuse=[paths["tiny_mc"]], **common)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DistillError, match="not a readable distill eval report"):
        runner.run({"student": "student"}, "tiny_mc,tiny_ppl", reuse=[tmp_path / "bad.json"], **common)


def test_sparse_cache_applies_to_the_student(task_dir, tmp_path):
    """--sparse-cache M switches the loaded student's cache; M ≥ the context makes it the teacher."""
    loaded = []

    def loader(spec, dtype=None):
        model = tiny_llama() if spec == "teacher" else tiny_student(window=2)
        loaded.append(model)
        return model, tiny_tokenizer()

    report = runner.run({"student": "student", "teacher": "teacher"}, "tiny_ppl", include_path=str(task_dir),
                        max_length=64, sparse_cache=64, loader=loader)
    assert report["settings"]["sparse_cache"] == 64
    assert loaded[1].distill_config.sparse_cache == 64
    row = next(r for r in report["rows"] if r["metric"] == "word_perplexity")
    assert row["student"] == pytest.approx(row["teacher"], rel=1e-4)
    # The same folder without the cache is another model: --reuse takes only the teacher.
    path = tmp_path / "with_cache.json"
    runner.write_report(report, path)
    again = runner.run({"student": "student", "teacher": "teacher"}, "tiny_ppl", include_path=str(task_dir),
                       max_length=64, loader=loader, reuse=[path])
    assert set(again["reused"]) == {"teacher"}
    plain = next(r for r in again["rows"] if r["metric"] == "word_perplexity")
    assert plain["student"] != pytest.approx(row["student"], rel=1e-4)
