"""End to end on the real demo model (SmolLM2-135M GGUF from PyPI) with configs/ci-smoke.yaml."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_smoke_conversion(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "import sys; from distill.cli import main; sys.exit(main())"]
    done = subprocess.run(
        cmd + ["convert", "demo", "--out", str(out), "--config", str(ROOT / "configs" / "ci-smoke.yaml")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out perplexity: teacher" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 30
    assert 5 < report["teacher_ppl"] < 60  # SmolLM2-135M on Wikipedia summaries, 256-token windows
    assert report["student_ppl"] < 5 * report["teacher_ppl"]
    assert all(r["transfer_mse_after"] < r["transfer_mse_before"] for r in report["layers"])

    from distill import load_converted

    model = load_converted(out)
    assert type(model).__name__ == "DistillLlamaForCausalLM"
    gen = subprocess.run(
        cmd + ["generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("The capital of France is")

    # the benchmark suite's conversion-cost and quality cases read this run; quality reloads the
    # saved student and must reproduce the report's held-out perplexity
    from benchmarks import run_cases
    from benchmarks.runner import Context

    ctx = Context(out=tmp_path / "bench", quick=True, student_dir=str(out))
    quality = run_cases.quality(ctx)
    assert quality.rows[0]["student"] == pytest.approx(report["student_ppl"], rel=1e-4)
    assert quality.rows[0]["teacher"] == report["teacher_ppl"]
    cost = run_cases.conversion(ctx)
    assert [r["stage"] for r in cost.rows][-1] == "total"
    assert {r["stage"] for r in cost.rows} >= {"fit", "transfer", "save"}
