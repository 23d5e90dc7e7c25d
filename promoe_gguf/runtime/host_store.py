"""HostStore: every routed expert's quantized bytes in host memory (pinned when a GPU is used).

One row per expert, one contiguous region per row (gate, up, down, each aligned to MATRIX_ALIGN):
an expert is one DMA, a matrix is one copy chunk. The same layout is used for the device cache's
slots, so a chunk lands at the same offset in its slot.
"""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from ..format.converter import MATRIX_ALIGN

log = logging.getLogger("promoe.runtime")


def _align(n: int, a: int = MATRIX_ALIGN) -> int:
    return -(-n // a) * a


class HostStore:
    def __init__(self, model, pin: bool = False, progress: bool = False):
        self.model = model
        self.keys = model.expert_keys
        self.row = {key: i for i, key in enumerate(self.keys)}
        self.layout = {}                                   # key -> [(MatrixSlice, offset in region)]
        for key in self.keys:
            pos, mats = 0, []
            for m in model.expert_matrices(*key):
                pos = _align(pos)
                mats.append((m, pos))
                pos += m.nbytes
            self.layout[key] = mats
        self.slot_bytes = _align(max(off + m.nbytes for mats in self.layout.values() for m, off in mats))
        self.expert_bytes = {key: sum(m.nbytes for m, _ in mats) for key, mats in self.layout.items()}
        self.pinned = False
        shape = (len(self.keys), self.slot_bytes)
        if pin:
            try:
                self.buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError as e:
                log.warning("could not pin %.1f MiB of host memory (%s); using pageable memory, "
                            "host-to-device copies will be slower", shape[0] * shape[1] / 2**20, e)
        if not self.pinned:
            self.buf = torch.empty(shape, dtype=torch.uint8)
        view = self.buf.numpy()
        for key in tqdm(self.keys, desc="loading experts", unit="expert", disable=not progress):
            r = self.row[key]
            for m, off in self.layout[key]:
                view[r, off:off + m.nbytes] = model.matrix_bytes(key[0], key[1], m.matrix)

    def chunks(self, key) -> list[tuple[int, int]]:
        """(offset, nbytes) of each copy chunk (one per matrix) of an expert's region."""
        return [(off, m.nbytes) for m, off in self.layout[key]]

    def region(self, key):
        return self.buf[self.row[key]]
