"""A converted folder loads in Hugging Face tools that know nothing of distill: through the
two-line ``modeling_distill.py`` that save_pretrained writes (``trust_remote_code=True``), in a
fresh interpreter and under the ``lm_eval`` command line."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from test_eval import task_dir, tiny_student, tiny_tokenizer  # noqa: F401  (task_dir is a fixture)

import distill

LM_EVAL = Path(sys.executable).with_name("lm_eval")


def _saved(tmp_path):
    model = tiny_student()
    model.save_pretrained(tmp_path / "student", tokenizer=tiny_tokenizer())
    return model, tmp_path / "student"


def test_remote_code_loads_the_same_model_in_a_fresh_interpreter(tmp_path):
    model, folder = _saved(tmp_path)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_distill.DistillForCausalLM"
    ids = [[5, 9, 13, 2, 7]]
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        f"print(json.dumps(m(torch.tensor({ids}), use_cache=False).logits[0, -1].tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        ref = model(torch.tensor(ids), use_cache=False).logits[0, -1]
    assert torch.allclose(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), ref, atol=1e-5)


def test_lm_eval_command_line_runs_a_converted_folder(tmp_path, task_dir):  # noqa: F811
    _, folder = _saved(tmp_path)
    cmd = [
        str(LM_EVAL), "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
        "--tasks", "tiny_ppl", "--include_path", str(task_dir), "--limit", "2", "--device", "cpu",
        "--output_path", str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["tiny_ppl"]["word_perplexity,none"] > 1.0


def test_the_default_path_needs_no_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    model, folder = _saved(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # distill is imported: its classes are registered
    assert type(loaded) is type(model) and type(loaded).__module__ == distill.convert_model.__module__
