"""Non-finite values caught where they start.

Always on: one check of each forward step's logits (a reduction over [T, n_vocab], cheap next to
the step), so NaN or inf never reaches a caller or the sampler. On demand (`Engine(check_numerics=
True)`, `--check-numerics`): a check after every block of every layer, so the error names the first
layer and block that produced a non-finite value: the token embedding, attention, the router,
routed expert E, the shared expert, the feed-forward sum, or the output head.

The model code holds a `numerics` attribute (OFF by default) and calls it at those points; the
Engine attaches a `Numerics` to the decoder and the expert seam.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ModelError


class NonFiniteError(ModelError):
    """A forward pass produced NaN or inf; the message names where it was first seen."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. A sum is finite only then (NaN and inf propagate, +inf and
    -inf make NaN), and one reduction is several times cheaper than isfinite(t).all(); only a sum
    that overflowed on finite values needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _what(t: torch.Tensor) -> str:
    """'NaN', 'inf' or 'NaN and inf', for the message."""
    nan = bool(torch.isnan(t).any())
    inf = bool(torch.isinf(t).any())
    return " and ".join(w for w, has in (("NaN", nan), ("inf", inf)) if has) or "non-finite values"


def _first_row(t: torch.Tensor) -> int:
    """The first row (token of the step) holding a non-finite value."""
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) if t.dim() > 1 else ~torch.isfinite(t)
    return int(bad.nonzero()[0, 0]) if bad.any() else 0


class Numerics:
    """enabled: check every block (costs a device sync per check); the logits are always checked.

    Also a listener of the expert seam (MoEExperts.listeners): begin_step tells it the absolute
    positions of the step's tokens, so messages name the position."""

    def __init__(self, enabled: bool = False, path: str = ""):
        self.enabled = bool(enabled)
        self.path = path
        self.positions: list[int] = []

    def begin_step(self, positions) -> None:
        self.positions = list(positions)

    def _position(self, row: int) -> str:
        return f"position {self.positions[row]}" if row < len(self.positions) else f"token {row} of the step"

    def _fail(self, where: str, what: str, row: int) -> NonFiniteError:
        prefix = f"{self.path}: " if self.path else ""
        return NonFiniteError(f"{prefix}{what} first produced by {where} (at {self._position(row)})")

    def check(self, t: torch.Tensor, layer: int | None, block: str) -> None:
        """After `block` of `layer` (None: before the first layer): raise if `t` is not finite."""
        if self.enabled and not all_finite(t):
            raise self._fail(block if layer is None else f"layer {layer}, {block}", _what(t), _first_row(t))

    def experts(self, layer: int, ids: torch.Tensor, outputs: torch.Tensor) -> None:
        """outputs [T, k, d]: slot (t, j) is expert ids[t, j]'s output; names the first bad expert."""
        if not self.enabled or all_finite(outputs):
            return
        bad = ~torch.isfinite(outputs).all(dim=-1)                            # [T, k]
        t, j = (int(i) for i in bad.nonzero()[0])
        raise self._fail(f"layer {layer}, expert {int(ids[t, j])}", _what(outputs[t, j]), t)

    def fused_experts(self, layer: int, out: torch.Tensor, ids, slot_output) -> None:
        """out [T, d] from one fused call over all of a layer's experts: on a non-finite row, each of
        that token's experts is recomputed alone (slot_output(t, j) -> [d], or None where it cannot
        be) to name the one that produced it."""
        if not self.enabled or all_finite(out):
            return
        t = _first_row(out)
        unknown = []
        for j in range(ids.shape[1]):
            y = slot_output(t, j)
            if y is None:
                unknown.append(int(ids[t, j]))
            elif not all_finite(y):
                raise self._fail(f"layer {layer}, expert {int(ids[t, j])}", _what(y), t)
        what = f"one of experts {unknown}" if unknown else "the routed experts' weighted sum"
        raise self._fail(f"layer {layer}, {what}", _what(out[t]), t)

    def host_logits(self, logits: np.ndarray) -> None:
        """A decode step's logits, already on the host: one numpy reduction, no device work."""
        if np.isfinite(logits.sum()) or np.isfinite(logits).all():
            return
        self.logits(torch.from_numpy(logits).reshape(1, -1))

    def logits(self, logits: torch.Tensor) -> None:
        """Every step: NaN/inf logits are an error, never a result."""
        if all_finite(logits):
            return
        row = _first_row(logits)
        if self.enabled:            # every block before was finite
            raise self._fail("the output head", _what(logits), row)
        prefix = f"{self.path}: " if self.path else ""
        raise NonFiniteError(f"{prefix}the logits hold {_what(logits)} (at {self._position(row)}); run with "
                             f"--check-numerics (Engine(check_numerics=True)) to find the first layer and block "
                             f"that produced them")


OFF = Numerics(enabled=False)


def attach(decoder, experts, enabled: bool, path: str = "") -> Numerics:
    """Give the decoder and the expert seam one checker (told each step's positions, for messages)."""
    n = Numerics(enabled, path)
    decoder.numerics = n
    experts.numerics = n
    experts.listeners.append(n)
    return n
