"""Datasets and small pretrained models for the demo, the tests and the benchmarks."""
