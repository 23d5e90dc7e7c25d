"""Expert cache, host store, transfer engine, prefetcher, policies and stats."""
from __future__ import annotations

from ..model.experts import ExpertSource


def make_source(model, device, cache_rate=None, cache_mem=None, policy="lru", predictor="none", link=None,
                **options) -> ExpertSource:
    """The expert source for an Engine: every expert resident when no cache budget is given."""
    if cache_rate is None and cache_mem is None:
        return ExpertSource(model, device)
    raise NotImplementedError("the expert cache runtime is not built yet")
