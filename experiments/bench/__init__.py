"""Benchmark scripts. Each prints ratios against a reference measured in the same run."""
