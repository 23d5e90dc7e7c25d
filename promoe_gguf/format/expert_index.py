"""Where every routed expert's bytes live in a GGUF file.

Three layouts occur in the wild, all mapped to the same index entry per (layer, expert):
  stacked  blk.N.ffn_{gate,up,down}_exps.weight   ne = [n_embd, n_ff, n_expert] / [n_ff, n_embd, n_expert]
  merged   blk.N.ffn_gate_up_exps.weight          ne = [n_embd, 2*n_ff, n_expert]; gate rows, then up rows
  legacy   blk.N.ffn_{gate,up,down}.E.weight      2D per expert (Mixtral GGUFs from Dec 2023)
Expert e of a stacked tensor is the contiguous byte run [data_offset + e*nb2, data_offset + (e+1)*nb2).
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ..errors import ModelError
from .quants import quant_type

MATRICES = ("gate", "up", "down")


@dataclass(frozen=True)
class MatrixSlice:
    """One expert matrix: `out = W @ x` with W of `shape` = (rows, cols) = (out, in)."""
    matrix: str                      # gate | up | down
    qtype: GGMLQuantizationType
    shape: tuple[int, int]
    offset: int                      # absolute byte offset in the source file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0]


def _ne(t) -> list[int]:
    return [int(d) for d in t.shape]


def _check_shape(t, want: list[int], path: str) -> None:
    if _ne(t) != want:
        raise ModelError(f"{path}: tensor {t.name!r} has shape {_ne(t)}, expected {want}")


def _stacked(t, expert: int, matrix: str, rows: int, row_off: int = 0) -> MatrixSlice:
    """Rows [row_off, row_off+rows) of expert `expert` in a stacked 3D tensor."""
    ne = _ne(t)
    rb = quant_type(t.tensor_type).row_bytes(ne[0])
    nb2 = ne[1] * rb
    return MatrixSlice(matrix, t.tensor_type, (rows, ne[0]),
                       int(t.data_offset) + expert * nb2 + row_off * rb, rows * rb)


def build_expert_index(tensors: dict, cfg, path: str) -> dict[tuple[int, int], tuple[MatrixSlice, ...]]:
    """(layer, expert) -> (gate, up, down) slices. `tensors` maps name -> gguf ReaderTensor."""
    index: dict[tuple[int, int], tuple[MatrixSlice, ...]] = {}
    d, E, F = cfg.n_embd, cfg.n_experts, cfg.n_ff_exp
    for layer in cfg.moe_layers:
        p = f"blk.{layer}."
        for name in (p + "ffn_gate_inp.weight",):
            if name not in tensors:
                raise ModelError(f"{path}: tensor {name!r} (router of layer {layer}) is missing")
            _check_shape(tensors[name], [d, E], path)
        down = tensors.get(p + "ffn_down_exps.weight")
        merged = tensors.get(p + "ffn_gate_up_exps.weight")
        gate, up = tensors.get(p + "ffn_gate_exps.weight"), tensors.get(p + "ffn_up_exps.weight")
        for t in (down, merged, gate, up):
            if t is not None:
                quant_type(t.tensor_type)  # unsupported quant type -> ModelError naming it
        if down is not None and (merged is not None or (gate is not None and up is not None)):
            _check_shape(down, [F, d, E], path)
            if merged is not None:
                _check_shape(merged, [d, 2 * F, E], path)
            else:
                _check_shape(gate, [d, F, E], path)
                _check_shape(up, [d, F, E], path)
            for e in range(E):
                if merged is not None:
                    g, u = _stacked(merged, e, "gate", F), _stacked(merged, e, "up", F, F)
                else:
                    g, u = _stacked(gate, e, "gate", F), _stacked(up, e, "up", F)
                index[(layer, e)] = (g, u, _stacked(down, e, "down", d))
        elif p + "ffn_gate.0.weight" in tensors or p + "ffn_down.0.weight" in tensors:
            for e in range(E):
                parts = []
                for m, want in (("gate", [d, F]), ("up", [d, F]), ("down", [F, d])):
                    name = f"{p}ffn_{m}.{e}.weight"
                    t = tensors.get(name)
                    if t is None:
                        raise ModelError(f"{path}: tensor {name!r} (expert {e} of layer {layer}) is missing")
                    _check_shape(t, want, path)
                    qt = quant_type(t.tensor_type)
                    parts.append(MatrixSlice(m, t.tensor_type, (want[1], want[0]), int(t.data_offset),
                                             want[1] * qt.row_bytes(want[0])))
                index[(layer, e)] = tuple(parts)
        else:
            missing = [n for n, t in (("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", down))
                       if t is None]
            raise ModelError(f"{path}: layer {layer} has no routed expert tensors "
                             f"(missing blk.{layer}.{', '.join(missing)})")
    return index


def is_expert_tensor(name: str) -> bool:
    """True for the tensors the expert index covers (they are not resident weights; the experts'
    biases, gpt-oss's ffn_*_exps.bias, are: small, and read by expert id)."""
    if not name.startswith("blk."):
        return False
    rest = name.split(".", 2)[2]
    if rest.startswith(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")):
        return rest.endswith(".weight")
    parts = rest.split(".")  # legacy: ffn_gate.E.weight
    return len(parts) == 3 and parts[0] in ("ffn_gate", "ffn_up", "ffn_down") and parts[1].isdigit()
