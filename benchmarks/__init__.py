"""Benchmark suite: ``python -m benchmarks --out DIR [--quick] [--cases a,b]``.

Each case checks correctness before it times anything; results go to DIR/results.json,
DIR/results.md and PNG plots.
"""
