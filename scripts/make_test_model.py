#!/usr/bin/env python3
"""The test-model factory's command line (promoe_gguf/testing/factory.py): small random-weight MoE
GGUFs quantized by llama.cpp, and real-shape models.

    python scripts/make_test_model.py OUT_DIR [--arch A ...] [--quant Q ...]
    python scripts/make_test_model.py OUT_DIR --real-shape mixtral-8x7b [--layers 4]
"""
import sys

from promoe_gguf.testing.factory import main

if __name__ == "__main__":
    sys.exit(main())
