"""Test models: the factory of small random-weight GGUFs quantized by llama.cpp (factory.py)."""
