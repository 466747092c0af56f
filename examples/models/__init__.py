"""Model definitions shared by examples, tests and benchmarks (no torchvision needed)."""
