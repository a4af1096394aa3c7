"""What runs: training, generation, the demo, experiments and benchmarks."""
