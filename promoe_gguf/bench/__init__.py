"""Benchmark helpers: real-shape synthetic models (real_shapes) and stock llama.cpp runs (llamacpp)."""
