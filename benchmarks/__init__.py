"""Speed and memory benchmarks: run ``python benchmarks/benchmark.py`` (see its docstring)."""
