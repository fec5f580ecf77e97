"""The dependency direction the code promises: kernels -> feature maps -> layer -> stages -> CLI,
and stages as siblings that share only pipeline/train.py and the helpers below it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fit", "transfer", "select", "finetune")
ABOVE_STAGES = ("run", "command", "report", "checkpoint", *STAGES)


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_no_other_stage(stage):
    imported = _imports(ROOT / "distill" / "pipeline" / f"{stage}.py")
    others = {f"distill.pipeline.{m}" for m in ABOVE_STAGES if m != stage}
    assert not imported & others, f"{stage}.py imports {sorted(imported & others)}"


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("kernels", ("distill",)),
        ("distill/feature_maps", ("distill.layer", "distill.rnn", "distill.convert", "distill.pipeline", "distill.eval")),
        ("distill/layer.py", ("distill.convert", "distill.pipeline", "distill.eval", "distill.cli")),
        ("distill/rnn.py", ("distill.layer", "distill.convert", "distill.pipeline", "distill.eval")),
        ("distill/softmax.py", ("distill.layer", "distill.rnn", "distill.convert", "distill.pipeline", "distill.eval")),
        ("distill/sparse_cache.py", ("distill.layer", "distill.convert", "distill.pipeline", "distill.eval", "distill.cli")),
    ],
)
def test_dependencies_run_one_way(folder, forbidden):
    path = ROOT / folder
    for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
        bad = sorted(m for m in _imports(file) if m.split(".")[0] in ("distill",) and m.startswith(forbidden))
        assert not bad, f"{file.relative_to(ROOT)} imports {bad}"
