"""Model definitions used by the demo, tests and end-to-end benchmarks."""
