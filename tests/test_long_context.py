"""The ``long`` suite of ``distill eval``: passkey prompts and scoring, loss by position, the report.

Everything runs offline on tiny random models built here (a 2-layer Llama over a byte-level
tokenizer, 2048 positions, and its hybrid conversion) and on text generated here; the Debian
Bible is never fetched.
"""
from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from transformers import LlamaConfig, LlamaForCausalLM

from distill import ConvertConfig, convert_model
from distill.cli import build_parser, main
from distill.errors import DistillError
from distill.eval import long_ppl, passkey, runner
from distill.eval.long_context import LongContextOptions, section
from distill.eval.passkey import INTRO, NEEDLE, QUESTION, PasskeyOptions
from test_eval import tiny_tokenizer  # one token per byte (+ <eos>): the worst case for hitting a length

POSITIONS = 2048


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=POSITIONS, bos_token_id=None, eos_token_id=256,
        pad_token_id=256, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def hybrid_student(seed: int = 0):
    """Hedgehog linear attention + a 4-token softmax window: state and window both in the cache."""
    return convert_model(tiny_llama(seed), ConvertConfig(feature_map="hedgehog", depth=1, window=4)).eval()


def count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved teacher and its converted student (both with the byte tokenizer), and a text file."""
    root = tmp_path_factory.mktemp("long")
    tok = tiny_tokenizer()
    tiny_llama().save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    hybrid_student().save_pretrained(root / "student", tokenizer=tok)
    rng = random.Random(0)
    words = ["the", "river", "ran", "past", "old", "mill", "and", "a", "bird", "sang", "over", "green", "hills"]
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(400)) + ".\n", encoding="utf-8")
    return root


# --- passkey prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [400, 777, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_length_and_key_depth(length, depth):
    tok = tiny_tokenizer()
    doc = passkey.build_prompt(tok, length, depth, "48213", offset=2)
    prompt, needle = doc["prompt"], " " + NEEDLE.format(key="48213")
    assert doc["n_tokens"] == count(tok, prompt) and abs(doc["n_tokens"] - length) <= 5
    assert prompt.startswith(INTRO) and prompt.endswith(QUESTION) and prompt.count(needle) == 1
    assert re.findall(r"\d+", prompt) == ["48213", "48213"]  # the key, twice, and no other digits
    # the needle's place, measured here: filler tokens before it, against depth x all filler tokens; it sits
    # at the sentence boundary closest to that, at most half the longest filler sentence (22 tokens) away
    before = count(tok, prompt[: prompt.index(needle)]) - count(tok, INTRO)
    filler = doc["n_tokens"] - count(tok, INTRO + needle + QUESTION)
    assert doc["needle_token"] == count(tok, prompt[: prompt.index(needle)])
    assert abs(before - depth * filler) <= 11
    assert doc["needle_depth"] == pytest.approx(before / filler, abs=0.01)
    if depth == 0:
        assert prompt.startswith(INTRO + needle)
    if depth == 1:
        assert prompt.endswith(needle + QUESTION)


def test_prompts_are_seeded():
    tok = tiny_tokenizer()
    options = PasskeyOptions(lengths=(300, 500), depths=(0, 0.5, 1), trials=2, seed=3)
    docs = passkey.build_docs(tok, options, POSITIONS)
    assert docs == passkey.build_docs(tok, options, POSITIONS)
    assert len(docs) == 2 * 3 * 2 and all(re.fullmatch(r"\d{5}", d["key"]) for d in docs)
    assert [(d["length"], d["depth"], d["trial"]) for d in docs[:3]] == [(300, 0.0, 0), (300, 0.0, 1), (300, 0.5, 0)]
    assert len({d["key"] for d in docs}) > 1  # each prompt its own key
    other = passkey.build_docs(tok, PasskeyOptions(lengths=(300, 500), depths=(0, 0.5, 1), trials=2, seed=4), POSITIONS)
    assert [d["key"] for d in other] != [d["key"] for d in docs]


def test_lengths_capped_at_positions_and_above_is_an_error():
    assert passkey.resolve_lengths(PasskeyOptions(), 2048) == [512, 1024, 2048]
    assert passkey.resolve_lengths(PasskeyOptions(), 1000) == [512, 1000]
    assert passkey.resolve_lengths(PasskeyOptions(), None) == [512, 1024, 2048, 4096, 8192]
    with pytest.raises(DistillError, match=r"4096 is above the model's max_position_embeddings \(2048\)"):
        passkey.resolve_lengths(PasskeyOptions(lengths=(512, 4096)), 2048)
    with pytest.raises(DistillError, match="too short"):
        passkey.build_prompt(tiny_tokenizer(), 100, 0.5, "12345")
    with pytest.raises(DistillError, match="depths"):
        PasskeyOptions(depths=(0.5, 1.5))


def test_exact_match_scoring():
    assert passkey.score(" 48213.", "48213") == 1.0
    assert passkey.score("48213 is the pass key", "48213") == 1.0
    assert passkey.score(" 4821", "48213") == 0.0  # a digit short
    assert passkey.score(" 482130", "48213") == 0.0  # a digit too many
    assert passkey.score(" 12345 or 48213", "48213") == 0.0  # only the first number counts
    assert passkey.score(" I don't know", "48213") == 0.0
    doc = {"key": "48213", "length": 1024, "depth": 0.25}
    assert passkey.process_results(doc, [" 48213"]) == {"acc": 1.0, "acc_1024": 1.0, "acc_1024_d0.25": 1.0}
    assert passkey.parse_cell("acc_1024_d0.25") == (1024, 0.25) and passkey.parse_cell("acc_1024") is None


class CannedLM(LM):
    """An lm-eval LM whose answer to a prompt is ``answer(prompt)``; it scores nothing else."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answer(r.args[0]) for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


@pytest.mark.parametrize("answer, want", [
    (lambda ctx: " " + re.search(r"pass key is (\d{5})", ctx).group(1) + ".", 1.0),  # copies the key from context
    (lambda ctx: " 00000.", 0.0),  # a key it never saw
])
def test_passkey_task_scores_copying_one_and_guessing_zero(folders, answer, want):
    """The shipped passkey.yaml, its prompts built from metadata as distill eval passes it, scored by lm-eval."""
    from lm_eval import simple_evaluate

    options = PasskeyOptions(lengths=(300, 600), depths=(0, 0.5, 1), trials=2)
    metadata = {"tokenizer": str(folders / "teacher"), **options.metadata()}
    manager = runner._manager(None, json.dumps(metadata, sort_keys=True))
    task = manager.load(["passkey"])["tasks"]["passkey"]
    assert len(list(task.eval_docs)) == 2 * 3 * 2
    results = simple_evaluate(model=CannedLM(answer), tasks=[task], task_manager=manager, bootstrap_iters=0)
    metrics = runner.task_metrics(results, "passkey")
    cells = {m for m in metrics if passkey.parse_cell(m)}
    assert cells == {f"acc_{n}_d{d:g}" for n in (300, 600) for d in (0, 0.5, 1)}
    assert {"acc", "acc_300", "acc_600"} <= metrics.keys()
    assert all(v == want for m, v in metrics.items() if m.startswith("acc")), metrics


# --- loss by position ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, hybrid_student], ids=["teacher", "student"])
def test_token_losses_and_buckets_match_direct_computation(make):
    model = make()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))  # (T,)
    got = long_ppl.token_losses(model, ids, chunk=64)  # through the cache, 64 tokens at a time
    with torch.no_grad():
        logits = model(ids[None], use_cache=False).logits[0]  # (T, V), one pass
    want = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")  # (T - 1,)
    assert got.shape == (299,) and torch.allclose(got, want, atol=1e-4, rtol=1e-4)

    edges = (0, 16, 64, 128, 512, 1024)
    buckets = long_ppl.bucket_sums(want, edges)
    assert [(lo, hi, n) for lo, hi, _, n in buckets] == [(0, 16, 15), (16, 64, 48), (64, 128, 64), (128, 512, 172)]
    positions = torch.arange(1, 300)  # the position of each loss
    for lo, hi, total, _ in buckets:
        assert total == pytest.approx(float(want[(positions >= lo) & (positions < hi)].sum()), rel=1e-6)


def test_long_ppl_on_a_text_file(folders):
    tok = tiny_tokenizer()
    out = long_ppl.evaluate(tiny_llama(), tok, long_ppl.LongPplOptions(tokens=500, docs=3, text=str(folders / "text.txt")))
    detail = out["long_ppl"]
    assert detail["window_tokens"] == 500 and len(detail["windows"]) == 3  # consecutive windows of the one document
    assert [b["name"] for b in detail["buckets"]] == ["0-64", "64-256", "256-1k"]  # nothing from 1k on
    assert [b["tokens"] for b in detail["buckets"]] == [3 * 63, 3 * 192, 3 * 244]
    metrics = out["results"]["long_ppl"]
    mean = sum(b["loss"] * b["tokens"] for b in detail["buckets"]) / sum(b["tokens"] for b in detail["buckets"])
    assert metrics["loss,none"] == pytest.approx(mean)
    assert out["higher_is_better"]["long_ppl"]["loss_64-256"] is False
    with pytest.raises(DistillError, match=r"max_position_embeddings \(2048\)"):
        long_ppl.evaluate(tiny_llama(), tok, long_ppl.LongPplOptions(tokens=4096, text=str(folders / "text.txt")))


def test_bible_reader_output_splits_into_books():
    printed = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus.\n\n1 John 1\n\n  1 That which.\n"
    assert long_ppl.split_books(printed) == {"Genesis": "In the beginning. And the earth.\n\nThus.", "1 John": "That which."}
    assert long_ppl.bucket_name(256, 1024) == "256-1k" and long_ppl.bucket_name(4096, 8192) == "4k-8k"


# --- distill eval --tasks long ------------------------------------------------------------------


def _cli(args, capsys):
    code = main(["eval", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_bad_long_text_is_one_line_and_writes_nothing(folders, tmp_path, capsys, kind):
    text = tmp_path / "text.txt"
    if kind == "empty":
        text.write_text("  \n")
    out = tmp_path / "r.json"
    code, err = _cli([str(folders / "student"), "--tasks", "long_ppl", "--long-text", str(text), "--out", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and str(text) in lines[0]
    assert ("empty" if kind == "empty" else "does not exist") in lines[0]
    assert not list(tmp_path.glob("r*"))


@pytest.mark.parametrize("positions", [600, 1021])
def test_prompts_at_the_maximum_leave_the_answer_room(positions):
    """A length equal to the model's positions gives prompts that fit with their answer; built without
    that limit, the closest prompt to the length itself leaves no room."""
    tok = tiny_tokenizer()
    options = PasskeyOptions(lengths=(positions,), trials=2)
    docs = passkey.build_docs(tok, options, positions)
    assert all(positions - 2 * passkey.MAX_GEN_TOKS <= d["n_tokens"] <= positions - passkey.MAX_GEN_TOKS for d in docs)
    assert all(d["n_tokens"] == count(tok, d["prompt"]) and d["length"] == positions for d in docs)
    free = [passkey.build_prompt(tok, positions, d["depth"], d["key"]) for d in docs]
    assert all(d["n_tokens"] > positions - passkey.MAX_GEN_TOKS for d in free)


def test_passkey_at_the_models_maximum_runs(folders, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, err = _cli([str(folders / "student"), "--tasks", "passkey", "--passkey-lengths", str(POSITIONS),
                      "--passkey-depths", "0.5", "--passkey-trials", "1", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["long_context"]["passkey"]["lengths"] == [POSITIONS]


def test_passkey_length_above_positions_exits_2(folders, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, err = _cli([str(folders / "student"), "--tasks", "passkey", "--passkey-lengths", "512,4096", "--out", str(out)],
                     capsys)
    assert code == 2 and "Traceback" not in err and "max_position_embeddings (2048)" in err
    assert not out.exists()


def test_cli_long_suite_report_and_plots(folders, tmp_path, capsys):
    out = tmp_path / "long.json"
    args = [str(folders / "student"), "--teacher", str(folders / "teacher"), "--tasks", "long",
            "--passkey-lengths", "300,500", "--passkey-depths", "0,1", "--passkey-trials", "1",
            "--long-ppl-tokens", "400", "--long-ppl-docs", "2", "--long-text", str(folders / "text.txt"),
            "--batch-size", "2", "--out", str(out)]
    code, err = _cli(args, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["tasks"] == ["passkey", "long_ppl"]
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    for key in [("passkey", "acc"), ("passkey", "acc_500_d1"), ("long_ppl", "loss"), ("long_ppl", "loss_64-256")]:
        assert rows[key]["teacher"] is not None and rows[key]["student"] is not None, key
    long = report["long_context"]
    assert long["passkey"]["lengths"] == [300, 500] and long["passkey"]["depths"] == [0.0, 1.0]
    assert set(long["passkey"]["accuracy"]) == {"teacher", "student"}
    lp = long["long_ppl"]
    assert lp["buckets"] == ["0-64", "64-256", "256-1k"] and lp["window_tokens"] == 400
    assert lp["ratio"] == pytest.approx([s / t for t, s in zip(lp["loss"]["teacher"], lp["loss"]["student"])])
    assert report["settings"]["long_context"]["passkey"]["lengths"] == [300, 500]
    for png in ("long_passkey.png", "long_long_ppl.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out.with_suffix(".md").read_text()
    assert "## Long context" in md and "![passkey accuracy](long_passkey.png)" in md and "| 64-256 |" in md
    assert "acc_500_d1" not in md  # the cells are in the grid, not in the main table
    assert not list(tmp_path.glob(".long*"))  # no temporary files left behind


def test_section_without_teacher():
    results = {"teacher": None, "student": {"results": {"passkey": {"acc,none": 0.5, "acc_512,none": 0.5,
                                                                   "acc_512_d0,none": 1.0, "acc_512_d1,none": 0.0}}}}
    long = section(results, LongContextOptions())
    assert long["passkey"]["accuracy"] == {"student": [[1.0, 0.0]]} and "long_ppl" not in long


def test_help_lists_the_long_suite_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--passkey-lengths", "--passkey-depths", "--passkey-trials", "--long-ppl-tokens", "--long-text"):
        assert flag in text
