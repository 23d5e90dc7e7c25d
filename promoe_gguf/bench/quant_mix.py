"""llama.cpp's quantizer as the source of a real-shape model's quant mix for the low-bit file types.

Q4_K_M's rules are few and real_shapes.q4_k_m_type states them. The 1-3-bit file types (IQ1_M,
IQ2_XXS, ...) have many more (per tensor kind, per layer, per expert count, per GQA ratio), so for
them the types are what llama.cpp's own quantizer chooses: a dry run (`llama_model_quantize` with
`dry_run`, nothing read or written but the header) over a sparse F16 skeleton of the model, with a
uniform importance matrix where the file type needs one. `scripts/quant_mixes.py` runs it for
MIXES and commits the result (promoe_gguf/data/quant_mixes.json, which real_shapes.tensor_plan
reads), so the simulator needs no llama.cpp; tests/test_real_shapes.py runs it again and compares.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from . import real_shapes

# (shape, llama.cpp file type): the low-bit mixes people run big MoE models at on a consumer card, and
# gpt-oss as published (MXFP4 experts)
MIXES = (("qwen3-235b-a22b", "IQ2_XXS"), ("deepseek-v3", "IQ1_M"), ("gpt-oss-20b", "MXFP4_MOE"),
         ("gpt-oss-120b", "MXFP4_MOE"))
FTYPES = {"IQ1_S": 24, "IQ1_M": 31, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_M": 29, "IQ3_XXS": 23, "IQ3_S": 26,
          "Q2_K": 10, "Q4_K_M": 15, "MXFP4_MOE": 38}
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_M", "IQ3_XXS")


def write_skeleton(name: str, path, n_layers: int | None = None) -> None:
    """The model as convert_hf_to_gguf writes it before quantizing (F16 weights, F32 norms, biases and
    routers), as a sparse file: a dry run never reads tensor data."""
    s = real_shapes.get_shape(name)
    w = gguf.GGUFWriter(str(path), s.arch)
    real_shapes.write_metadata(w, name, n_layers)
    total = 0
    for t in real_shapes.tensor_plan(name, n_layers):
        ft = T.F16 if real_shapes.is_quantized_by_llamacpp(t.name, t.ne) else T.F32
        nbytes = int(np.prod(t.ne)) * (2 if ft == T.F16 else 4)
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), nbytes, raw_dtype=ft)
        total += gguf.GGUFWriter.ggml_pad(nbytes, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    start = gguf.GGUFWriter.ggml_pad(w.fout[0].tell(), w.data_alignment)
    w.close()
    os.truncate(path, start + total)


def uniform_imatrix(src):
    """An importance matrix that weighs every input column alike, for each matrix of `src` (per expert
    for stacked experts). Returns (the NULL-terminated llama_model_imatrix_data array, the buffers it
    points into: keep them alive while it is used)."""
    import llama_cpp
    entries, keep = [], []
    for t in gguf.GGUFReader(str(src)).tensors:
        ne = [int(x) for x in t.shape]
        if len(ne) < 2 or not t.name.endswith(".weight"):
            continue
        values = np.ones(ne[0] * (ne[2] if len(ne) > 2 else 1), dtype=np.float32)
        name = t.name.encode()
        keep += [values, name]
        entries.append(llama_cpp.llama_model_imatrix_data(
            name, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size))
    return (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))(*entries), keep


@contextlib.contextmanager
def captured_llama_log(lines: list):
    """Route llama.cpp's log into `lines`, then give the log back to llama-cpp-python's callback."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
    try:
        yield
    finally:
        from llama_cpp import _logger
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# "[  3/323] blk.0.attn_k.weight - [ 4096, 1024, 1, 1], type = f16, size = 32.00 MiB -> 8.50 MiB (q8_0)"
_LINE = re.compile(r"\]\s+(\S+)\s+- \[([\d, ]+)\], type =\s*(\w+),\s*size =[^\n]*?(?:\((\w+)\))?\n")


def dry_run(src, ftype: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor: (type stored, ne, the type llama.cpp would write)} for `src` at file type `ftype`."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 1
    params.dry_run = True
    params.allow_requantize = True
    keep = None
    if ftype in NEEDS_IMATRIX:
        keep = uniform_imatrix(src)
        params.imatrix = keep[0]
    log: list[str] = []
    with captured_llama_log(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(src).encode() + b".out", ctypes.byref(params))
    text = "".join(log)
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer (dry run, {ftype}) failed on {src}:\n{text[-2000:]}")
    out = {}
    for m in _LINE.finditer(text):
        ne = [int(x) for x in m.group(2).split(",")]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        stored = m.group(3).upper()
        out[m.group(1)] = (stored, tuple(ne), (m.group(4) or stored).upper())
    return out


def llamacpp_mix(name: str, ftype: str, workdir) -> dict[str, str]:
    """{tensor: type name} llama.cpp's quantizer gives the full `name` model at `ftype`."""
    src = Path(workdir) / f"skeleton-{name}.gguf"
    write_skeleton(name, src)
    try:
        return {k: target for k, (_, _, target) in dry_run(src, ftype).items()}
    finally:
        src.unlink(missing_ok=True)


def write_table(workdir, progress: bool = True) -> dict:
    """Run every mix of MIXES through the dry run and write promoe_gguf/data/quant_mixes.json."""
    from tqdm import tqdm
    table: dict = {}
    for name, ftype in tqdm(MIXES, desc="llama.cpp dry runs", disable=not progress):
        table.setdefault(name, {})[ftype] = llamacpp_mix(name, ftype, workdir)
    real_shapes.MIX_TABLE.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    real_shapes.recorded_mixes.cache_clear()
    return table
