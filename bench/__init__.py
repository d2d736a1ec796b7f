"""Benchmarks against peer tools: one side-by-side table per run (not tests).

Each public module is one comparison, run as ``python -m bench.NAME``. What several of them share lives
in the underscored modules: ``_table`` (the Markdown table, mean ± sd cells), ``_timing`` (torch's threads
fixed for a block, round-robin medians), ``_models`` (a built-in architecture from another seed, trained
and cached), ``_peers`` (the peer tools as every benchmark runs them) and ``_quantize`` (what the two
quantization benchmarks measure alike).
"""
