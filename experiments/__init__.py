"""What runs: demo, benchmarks (and later training, generation, experiments)."""
