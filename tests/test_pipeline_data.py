"""Calibration data: local files and folders, the held-out split, and clear errors."""
import json

import pytest
import torch
from pipeline_tiny import sentences, tiny_tokenizer, write_text

from distill.errors import DistillError
from distill.pipeline.run_config import load_run_config
from distill.pipeline.data import prepare_data

SMALL = ["seq_len=32", "calib_tokens=128", "heldout_tokens=64"]


def _data(source, *extra):
    cfg = load_run_config(None, SMALL + [f"data={source}", *extra])
    return prepare_data(cfg, None, tiny_tokenizer())


def test_txt_file_windows_and_split(tmp_path):
    data = _data(write_text(tmp_path / "a.txt"))
    assert data.train.shape == (4, 32) and data.heldout.shape == (2, 32)
    assert data.train.dtype == torch.long
    # Held-out documents (every 10th paragraph) never appear in the training windows.
    tok = tiny_tokenizer()
    train_text = tok.decode(data.train.flatten())
    heldout_docs = sentences(200)[::10]
    assert not any(doc in train_text for doc in heldout_docs if len(doc) > 30)


def test_jsonl_and_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"text": s} for s in sentences(100, seed=1)]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    write_text(folder / "b.txt", 100, seed=2)
    (folder / "ignored.csv").write_text("x,y\n")
    data = _data(folder)
    assert data.train.shape == (4, 32)
    same = _data(folder)
    assert torch.equal(data.train, same.train)  # deterministic for a seed


def test_few_documents_hold_out_the_stream_tail(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(sentences(60)), encoding="utf-8")  # a single paragraph
    data = _data(path)
    assert data.heldout.shape == (2, 32)


def test_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DistillError, match="holds no text"):
        _data(empty)
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(sentences(12)))
    with pytest.raises(DistillError, match="fewer than calib_tokens"):
        _data(short, "calib_tokens=4096")
    with pytest.raises(DistillError, match="does not exist"):
        _data(tmp_path / "missing.txt")
    with pytest.raises(DistillError, match="no .txt or .jsonl"):
        (tmp_path / "nothing").mkdir()
        _data(tmp_path / "nothing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "hello"}\n')
    with pytest.raises(DistillError, match="no string field 'text'"):
        _data(bad)
    bad.write_text("not json\n")
    with pytest.raises(DistillError, match="not valid JSON"):
        _data(bad)


def test_self_sampling_is_seeded():
    from pipeline_tiny import tiny_model

    model = tiny_model()
    cfg = load_run_config(None, ["seq_len=16", "calib_tokens=32", "heldout_tokens=16", "data=self"])
    a = prepare_data(cfg, model, tiny_tokenizer())
    b = prepare_data(cfg, model, tiny_tokenizer())
    assert a.train.shape == (2, 16) and a.heldout.shape == (1, 16)
    assert torch.equal(a.train, b.train)
    assert not torch.equal(a.train[0], a.heldout[0])
