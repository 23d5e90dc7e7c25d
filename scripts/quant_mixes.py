#!/usr/bin/env python3
"""Record llama.cpp's quant mix of each low-bit real shape (promoe_gguf/bench/quant_mix.py's MIXES)
into promoe_gguf/data/quant_mixes.json: dry runs of its quantizer, nothing is quantized."""
import tempfile

from promoe_gguf.bench.quant_mix import write_table

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        table = write_table(d)
    for name, mixes in table.items():
        for ftype, mix in mixes.items():
            print(f"{name} {ftype}: {len(mix)} tensors, types {sorted(set(mix.values()))}")
