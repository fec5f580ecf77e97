"""benchmarks/runner.py: results of separate runs into one folder add up; reruns replace."""
import json

from benchmarks.runner import Result, machine, write_results


def test_results_of_separate_runs_add_up(tmp_path):
    info = machine()
    write_results(tmp_path, info, {"a": Result([{"x": 1}], notes=["first"])})
    write_results(tmp_path, info, {"b": Result([{"y": 2}]), "c": "ValueError: broken"})
    write_results(tmp_path, info, {"a": Result([{"x": 3}], notes=["again"], ran="then")})
    cases = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert list(cases) == ["a", "b", "c"]
    assert cases["a"]["rows"] == [{"x": 3}] and cases["a"]["notes"] == ["again"] and cases["a"]["ran"] == "then"
    assert cases["b"]["rows"] == [{"y": 2}] and cases["c"]["error"] == "ValueError: broken"
    md = (tmp_path / "results.md").read_text()
    assert "## a" in md and "| 3 |" in md and "first" not in md and "## b" in md and "Failed: ValueError: broken" in md
