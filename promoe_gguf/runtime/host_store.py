"""HostStore: every routed expert's quantized bytes in host memory (pinned when a GPU is used).

Experts are packed one after another, each region aligned to REGION_ALIGN and taking its own size
(gate, up, down inside it, each aligned to MATRIX_ALIGN): an expert is one DMA, a matrix is one
copy chunk. A device cache slot uses the same in-region layout (slot_bytes = the largest region),
so a chunk lands at the same offset in its slot.

Pinning registers the store's own memory with CUDA (cudaHostRegister) instead of asking torch's
pinned allocator, which rounds every block up to a power of two (29 GB of Mixtral experts would
pin 32 GiB).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..backends import matrix_at
from ..format.converter import EXPERT_ALIGN as REGION_ALIGN
from ..format.converter import MATRIX_ALIGN, region_layout

log = logging.getLogger("promoe.runtime")
CHUNK_BYTES = 8 << 20      # the copy unit: a precise copy waits behind at most one chunk of a speculative one


def _align(n: int, a: int = MATRIX_ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Piece:
    """A copy unit: `rows` runs of `nbytes` bytes, `pitch` apart, from `offset` of an expert's region
    to the same offsets of a slot; zero: zeros written there instead (nothing crosses the link)."""
    offset: int
    nbytes: int
    rows: int = 1
    pitch: int = 0
    zero: bool = False

    @property
    def wire_bytes(self) -> int:
        return 0 if self.zero else self.nbytes * self.rows

    def view(self, flat: torch.Tensor, base: int) -> torch.Tensor:
        """The piece's bytes in `flat` (a uint8 tensor) when the region starts at `base`."""
        if self.rows == 1:
            return flat[base + self.offset:base + self.offset + self.nbytes]
        return torch.as_strided(flat, (self.rows, self.nbytes), (self.pitch, 1), flat.storage_offset() + base + self.offset)


@dataclass(frozen=True)
class StoreLayout:
    """Where every expert goes, computed from the model's index alone (no bytes read)."""
    keys: list                      # (layer, expert), in store order
    matrices: dict                  # key -> [(MatrixSlice, offset in region)]
    region: dict                    # key -> (offset in the store, region bytes)
    total_bytes: int                # the store's size
    slot_bytes: int                 # a cache slot: the largest region
    _pieces: dict = field(default_factory=dict, compare=False, repr=False)   # key -> its copy pieces

    @classmethod
    def of(cls, model) -> "StoreLayout":
        keys = model.expert_keys
        matrices, region, pos = {}, {}, 0
        for key in keys:
            mats = model.expert_matrices(*key)
            offs, size = region_layout(mats)
            matrices[key] = list(zip(mats, offs))
            region[key] = (pos, size)
            pos = _align(pos + size, REGION_ALIGN)
        slot = _align(max(n for _, n in region.values()))
        return cls(keys, matrices, region, pos, slot)

    def pieces(self, key) -> tuple[Piece, ...]:
        """The copy of a whole expert: its matrices in order, each cut into pieces of at most
        CHUNK_BYTES (a piece never spans two matrices). Made once per expert: the copy thread and
        the placement's queue sums ask for them at every chunk."""
        out = self._pieces.get(key)
        if out is None:
            out = self._pieces[key] = tuple(Piece(off + lo, min(CHUNK_BYTES, m.nbytes - lo))
                                            for m, off in self.matrices[key] for lo in range(0, m.nbytes, CHUNK_BYTES))
        return out

    def chunks(self, key) -> list[tuple[int, int]]:
        """(offset in the region, nbytes) of each copy chunk of an expert (its pieces)."""
        return [(p.offset, p.nbytes) for p in self.pieces(key)]


    def part_pieces(self, key, lo: int) -> list[Piece]:
        """The copy of an expert split at intermediate row `lo` (a multiple of down's block): zeros
        where the CPU's rows are (gate's and up's first lo rows, down's first lo columns), then the
        device's rows, in pieces of at most CHUNK_BYTES."""
        (gate, g_off), (up, u_off), (down, d_off) = self.matrices[key]
        zeros, copies = [], []
        for m, off in ((gate, g_off), (up, u_off)):
            rb = m.nbytes // m.shape[0]
            zeros.append(Piece(off, lo * rb, zero=True))
            for a in range(lo * rb, m.nbytes, CHUNK_BYTES):
                copies.append(Piece(off + a, min(CHUNK_BYTES, m.nbytes - a)))
        rows, rb = down.shape[0], down.nbytes // down.shape[0]
        cut = lo * rb // down.shape[1]                 # bytes of a down row that hold its first lo columns
        zeros.append(Piece(d_off, cut, rows, rb, zero=True))
        step = max(1, CHUNK_BYTES // max(1, rb - cut))
        for r in range(0, rows, step):
            n = min(step, rows - r)
            copies.append(Piece(d_off + r * rb + cut, rb - cut, n, rb))
        return [p for p in zeros if p.nbytes] + copies


class HostStore:
    def __init__(self, model, pin: bool = False, progress: bool = False):
        self.model = model
        self.store_layout = lay = StoreLayout.of(model)
        self.keys, self.layout, self.slot_bytes = lay.keys, lay.matrices, lay.slot_bytes
        self._region = lay.region
        self.expert_bytes = {key: sum(m.nbytes for m, _ in mats) for key, mats in self.layout.items()}
        self.buf = torch.empty(lay.total_bytes, dtype=torch.uint8)
        view = self.buf.numpy()
        for key in tqdm(self.keys, desc="loading experts", unit="expert", disable=not progress):
            base = self._region[key][0]
            for m, off in self.layout[key]:
                view[base + off:base + off + m.nbytes] = model.matrix_bytes(key[0], key[1], m.matrix)
        self.pinned = pin and self._register()
        self._views: dict = {}

    def _register(self) -> bool:
        """Page-lock the store in place; pageable memory (with a warning) if CUDA refuses."""
        try:
            rc = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.buf.numel(), 0)
            err = int(rc)                          # torch's cudaError enum: 0 is cudaSuccess
        except (RuntimeError, AttributeError) as e:
            err, rc = -1, e
        if err != 0:
            log.warning("could not pin %.1f MiB of host memory (%s); using pageable memory, host-to-device "
                        "copies will be slower", self.buf.numel() / 2**20, rc)
            return False
        return True

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def chunks(self, key) -> list[tuple[int, int]]:
        return self.store_layout.chunks(key)

    def region(self, key) -> torch.Tensor:
        start, n = self._region[key]
        return self.buf[start:start + n]

    def piece(self, key, piece: Piece) -> torch.Tensor:
        return piece.view(self.buf, self._region[key][0])

    def matrices(self, key):
        """(gate, up, down) of an expert as QMatrix views of the store (the CPU computes from these);
        made once per expert (the CPU pool asks for them at every miss)."""
        mats = self._views.get(key)
        if mats is None:
            start = self._region[key][0]
            mats = self._views[key] = tuple(matrix_at(self.buf, start + off, m.matrix, m.qtype, m.shape)
                                            for m, off in self.layout[key])
        return mats

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False
