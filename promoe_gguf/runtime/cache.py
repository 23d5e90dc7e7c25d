"""The device expert cache: a fixed arena of slots, a residency map and eviction policies.

All slot state is guarded by `ExpertCache.cv` (one condition variable shared with the transfer
engine). A slot is EMPTY, LOADING (its copy task has landed `ready_chunks` of the expert's chunks) or READY;
`pins` > 0 while the compute thread reads it; `needed` marks experts the current layer still has
to compute: those are never evicted, whatever the policy (the compute thread takes ready experts
first, so the slots they hold come free).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .. import limits
from ..errors import ModelError, ParameterError, clip

EMPTY, LOADING, READY = "empty", "loading", "ready"
USE_DECAY = 0.9            # per token: a use 10 tokens ago counts about a third of a use now
PREDICTED_BONUS = 1.0      # a fresh prediction counts as one use


@dataclass(eq=False)                 # a slot is itself: kept in sets by identity
class Slot:
    index: int
    key: tuple | None = None
    state: str = EMPTY
    ready_chunks: int = 0
    pins: int = 0
    last_use: int = 0
    speculative: bool = False        # loaded by a prediction and not used yet
    permanent: bool = False          # the static policy's hot experts
    free_event: object = None        # CUDA: recorded after the last kernel that read the slot


class Policy:
    """Per-layer LRU (as ProMoE and mixtral-offloading): each MoE layer owns an equal share of the
    slots, and a layer at its share evicts its own least recently used expert, so filling one layer
    (a miss, or a prefetch) never pushes out another layer's experts. A precise request may borrow
    beyond the share (prefill can need more experts in a layer than its share); a speculative one may not.
    """
    name = "lru"
    prefetch_touches = False         # does loading a prediction count as a use?
    partitioned = True
    reactive = True                  # load on miss, in plain order (mixtral-offloading's baseline)
    guards_predictions = False       # are the next layer's predicted experts safe from other guesses?

    def rank(self, cache: "ExpertCache", slot: Slot):
        """Lower goes first."""
        return slot.last_use

    def worth(self, cache: "ExpertCache", key, victim: Slot) -> bool:
        """May a guess for `key` displace `victim`? (LRU: any victim it may touch at all.)"""
        return True

    def hot_set(self, keys: list, n_slots: int) -> list:
        """Experts copied in at start-up and kept for good (none but for the static policy)."""
        return []

    def victim(self, cache: "ExpertCache", protected: set, layer: int, speculative: bool):
        if speculative and cache.prefill and layer > cache.layer_now:
            slot = cache.first_empty() or self._behind(cache, protected)
            # the guess is used within this step: its value counts that use, as much as the last
            # layer's experts got from this step's tokens
            if slot is not None and cache.value(cache.admitting) + cache.step_use > cache.value(slot.key):
                return slot
        slot = self._victim(cache, protected, layer, speculative)
        if slot is not None and speculative and slot.key is not None and not self.worth(cache, cache.admitting, slot):
            return None
        return slot

    def _behind(self, cache: "ExpertCache", protected: set):
        """Prefill: a guess for a layer still ahead in this step (its copy overlaps the layers before
        it) takes an empty slot if the arena has one, else the lowest-ranked slot of a layer this step
        has already run (next needed next step at the earliest), if it is worth more counting the use
        it will have within this step (the experts the prompt's last tokens chose are worth more).
        Without this a chunk's guesses found no slot (every slot of the next layer is predicted and
        protected, the rest used this step) and the link idled through
        each layer's attention. Layers still ahead keep their experts: this step needs them. An empty
        slot goes first: evicting while one was free left a warm cache with empty slots and cost the
        next prompt copies (simulated, 16 GB Qwen3-30B-A3B, 4096-token prefill: 3662 tok/s that way,
        4269 without the rule, 4446 with it as it is)."""
        return min((s for other, slots in cache.by_layer.items() if other < cache.layer_now for s in slots
                    if not (s.state == LOADING or s.pins or s.permanent or s.key in protected)),
                   key=lambda s: (self.rank(cache, s), s.index), default=None)

    def _victim(self, cache: "ExpertCache", protected: set, layer: int, speculative: bool):
        """An empty slot while `layer` is under its share (else a slot of a layer over its share), then
        the layer's own lowest-ranked slot; a precise request may then take any slot. In prefill, a slot
        of a layer already run goes before one of a layer still ahead, whose experts this step needs
        (by rank alone, once a step's uses count at once, Mixtral-8x7B's 512-token prefill on a 12 GB card
        was simulated at 542 tok/s against 663). Reads the cache's per-layer index, so a search looks at one
        layer's slots, not the whole arena."""
        def usable(s):
            return not (s.state == LOADING or s.pins or s.permanent or s.key in protected) and (
                not speculative or s.last_use <= cache.step_tick)   # a guess never displaces this step's experts

        def lowest(slots):
            return min(slots, key=lambda s: (cache.prefill and s.key[0] > cache.layer_now, self.rank(cache, s), s.index),
                       default=None)
        empty = cache.first_empty()
        if not self.partitioned:
            return empty or lowest(s for s in cache.slots if s.key is not None and usable(s))
        count, quota = cache.layer_count, cache.layer_quota
        if count.get(layer, 0) < quota:
            if empty is not None:
                return empty
            over = lowest(s for other, n in count.items() if n > quota for s in cache.by_layer[other] if usable(s))
            if over is not None:
                return over
        own = lowest(s for s in cache.by_layer.get(layer, ()) if usable(s))
        if own is not None or speculative:
            return own
        return empty or lowest(s for s in cache.slots if s.key is not None and usable(s))


class PromoePolicy(Policy):
    """Keeps the most valuable experts: value = uses decayed per token (so frequency and recency) +
    a bonus while the predictor expects it in the next layers or the next token. The victim is the
    lowest-valued evictable expert, and a prefetch only displaces an expert worth less than the one it
    brings; the next layer's predicted experts are protected from other guesses. Early preemption
    and reordered execution (not reactive)."""
    name = "promoe"
    prefetch_touches = False         # a guess is valued by its prediction bonus, not as a use
    reactive = False
    guards_predictions = True

    def rank(self, cache, slot):
        return (cache.value(slot.key), slot.last_use)

    def worth(self, cache, key, victim):
        return cache.value(key) > cache.value(victim.key)


class StaticPolicy(Policy):
    """The most-used experts (by recorded use counts) stay for good; the remaining slots serve misses (LRU)."""
    name = "static"
    partitioned = False

    def __init__(self, use_counts: dict | None, n_buffer: int):
        self.use_counts, self.n_buffer = use_counts or {}, n_buffer

    def hot_set(self, keys: list, n_slots: int) -> list:
        ranked = sorted(keys, key=lambda k: (-self.use_counts.get(k, 0), k))
        return ranked[:max(0, n_slots - self.n_buffer)]


def use_weights(ids) -> dict[int, float]:
    """{expert: its uses in a step of T tokens, each decayed per token to the step's end} for the
    step's [T, k] choices. A prefill step counts as its T tokens would one by one: the experts the
    prompt's last tokens chose are worth most after it, as decode's next tokens tend to choose them;
    one use for every expert a 512-token step touched left the cache a random pick of the prompt's
    experts for decode."""
    ids = np.asarray(ids).reshape(len(ids), -1)
    w = np.repeat(USE_DECAY ** np.arange(len(ids) - 1, -1, -1, dtype=np.float64), ids.shape[1])
    counts = np.bincount(ids.ravel(), weights=w)
    return {int(e): float(counts[e]) for e in np.flatnonzero(counts)}


def make_policy(name: str, n_used: int, use_counts=None) -> Policy:
    if name == "lru":
        return Policy()
    if name == "promoe":
        return PromoePolicy()
    if name == "static":
        return StaticPolicy(use_counts, n_buffer=max(2, n_used))
    raise ParameterError("policy", f"{clip(name)} is not one of lru, static, promoe")


def slots_for_budget(store, n_used: int, cache_rate=None, cache_mem=None) -> int:
    """Number of slots a budget buys; refuses budgets below one layer's top-k working set."""
    total = len(store.keys)
    if cache_mem is not None:
        name, value, n = "cache_mem", f"{int(cache_mem):,} bytes", int(cache_mem) // store.slot_bytes
    else:
        limits.check("cache_rate", cache_rate)
        name, value, n = "cache_rate", f"{cache_rate}", math.ceil(float(cache_rate) * total)
    if n < n_used:
        raise ParameterError(name, f"{value} holds {n} expert(s) of {store.slot_bytes:,} bytes, fewer than one "
                                   f"layer's top-{n_used} working set ({n_used * store.slot_bytes:,} bytes)")
    return min(n, total)


class ExpertCache:
    """The arena of slots and the residency map (`where`: expert -> slot; a slot is READY once its
    copy has landed). The device's expert -> slot table is not kept here: a layer's table is the
    host's answer to `CachedExpertSource.acquire` (the experts it pinned, READY), copied to the device
    inside the step with the routing's other inputs. A table the copy thread wrote on the device
    would cost a host sync per write (a 4-byte pageable copy) and race the kernels reading it."""

    def __init__(self, n_slots: int, slot_bytes: int, device, policy: Policy, moe_layers=(0,)):
        self.device = torch.device(device)
        n_moe_layers = len(moe_layers)
        try:
            self.arena = torch.empty((n_slots, slot_bytes), dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as e:
            raise ModelError(f"out of device memory allocating the expert cache "
                             f"({n_slots} slots x {slot_bytes:,} bytes): {e}") from e
        self.slots = [Slot(i) for i in range(n_slots)]
        # take_staging: the arena's last rows for the device's part of a split expert
        # (runtime/placement.py), used in turn by consecutive layers, never holding a cached expert
        self.staging: list = []
        self.staged: dict = {}          # key -> staging slot while its layer computes a split expert
        self.filled = 0                 # slots below this index hold an expert; the rest are EMPTY
        self.by_layer: dict[int, set] = {}                # the slots each layer holds
        self.where: dict[tuple, Slot] = {}
        self.layer_count: dict[int, int] = {}             # slots held per layer
        self.layer_quota = max(1, n_slots // max(1, n_moe_layers))
        self._n_moe_layers = n_moe_layers
        self.policy = policy
        self.cv = threading.Condition()
        self.tick = 0
        self.step_tick = 0              # cache.tick when the current forward step began
        self.needed: set = set()        # experts the current layer still has to compute
        self.layer_now = -1             # the layer the compute thread is at (mark_needed)
        self.prefill = False            # the current step has more than one token
        self.uses: dict = {}            # key -> (decayed use count, at token): the promoe policy's value
        self.predicted: dict = {}       # key -> step up to which the predictor expects it
        self.step = 0                   # forward steps so far (tokens in decode)
        self.tokens = 0                 # tokens of the steps begun so far: the clock uses decay by
        self.step_use = 1.0             # a needed expert's mean use weight in this step's last layer (prefill)
        self.admitting = None           # key a speculative allocation is for (the policy weighs it)
        self.hold_needed = False        # a fused step waits for all of `needed` at once: none may go
        self.protected: set = set()     # promoe: experts the next layer is predicted to need

    def mark_present(self, slot: Slot) -> None:
        """(cv held) slot's copy has landed: READY."""
        slot.state = READY

    def take_staging(self, n: int, keep_free: int = 1) -> bool:
        """(cv held) The last n slots become staging rows, if none of them holds an expert yet and at
        least keep_free of the rest can still take a miss (the budget stays the same: the cache has n
        slots fewer)."""
        keep = len(self.slots) - n
        if (self.staging or n <= 0 or self.filled > keep
                or sum(1 for s in self.slots[:keep] if not s.permanent) < keep_free):
            return False
        self.staging = [Slot(s.index) for s in self.slots[keep:]]
        self.slots = self.slots[:keep]
        self.layer_quota = max(1, keep // max(1, self._n_moe_layers))
        return True

    def stage(self, key, slot: Slot) -> None:
        """(cv held) The layer computes `key`'s device part from staging `slot`."""
        self.staged[key] = slot

    def unstage(self, key) -> None:
        """(cv held) The split layer has run: its staging slot may be written again."""
        del self.staged[key]

    def keep(self, slot: Slot) -> None:
        """(cv held) slot stays for good (the static policy's hot set, copied at start-up)."""
        slot.permanent = True

    def chunk_landed(self, slot: Slot, n_ready: int) -> None:
        """(cv held) the first n_ready chunks of slot's copy are on the device (a reader may start)."""
        slot.ready_chunks = n_ready

    def loading(self, slot: Slot, speculative: bool) -> None:
        """(cv held) a copy into slot starts: a guess (speculative) or a precise request."""
        slot.state, slot.ready_chunks, slot.speculative = LOADING, 0, speculative

    def first_empty(self) -> Slot | None:
        """(cv held) The lowest EMPTY slot (slots fill in index order and are never emptied)."""
        return self.slots[self.filled] if self.filled < len(self.slots) else None

    @property
    def capacity_bytes(self) -> int:
        return self.arena.numel()

    def begin_step(self, n_tokens: int = 1) -> None:
        """(cv held) A forward step of n_tokens starts: remember the use clock, for speculative eviction."""
        self.step_tick = self.tick
        self.step += 1
        self.tokens += n_tokens
        self.prefill = n_tokens > 1
        self.layer_now = -1

    def record_use(self, key, weight: float = 1.0) -> None:
        """(cv held) `key` was needed in the step just run (settled before the next begins), wherever it
        ran: `weight` is its tokens' uses decayed to the step's end (use_weights), 1 in decode."""
        v, at = self.uses.get(key, (0.0, self.tokens))
        self.uses[key] = (v * USE_DECAY ** (self.tokens - at) + weight, self.tokens)

    def record_step_uses(self, layer: int, ids) -> None:
        """(cv held) A prefill step's [T, k] choices at `layer`, valued at once and by token (use_weights):
        the step's later evictions and guesses keep what its last tokens chose."""
        weights = use_weights(ids)
        for e, weight in weights.items():
            self.record_use((layer, e), weight)
        self.step_use = sum(weights.values()) / len(weights)

    def value(self, key) -> float:
        """(cv held) Uses decayed per token, plus PREDICTED_BONUS while a prediction for it is fresh."""
        if key is None:
            return -1.0
        v, at = self.uses.get(key, (0.0, self.tokens))
        bonus = PREDICTED_BONUS if self.predicted.get(key, -1) >= self.step else 0.0
        return v * USE_DECAY ** (self.tokens - at) + bonus

    def touch(self, slot: Slot) -> None:
        self.tick += 1
        slot.last_use = self.tick

    def allocate(self, key, on_evict, speculative: bool = False) -> Slot | None:
        """(cv held) A slot for `key`, evicting a victim; None when nothing can be evicted now.

        The promoe policy's protection of the next layer's predicted experts holds against other
        predictions only: a precise request must always be able to make room."""
        # a reactive baseline computes in plain order, so it may evict an expert its layer still
        # needs (LRU thrashing in prefill, as in the systems it stands for); promoe never does
        guard = set() if self.policy.reactive and not speculative and not self.hold_needed else self.needed
        if speculative and self.policy.guards_predictions:
            guard = guard | self.protected
        self.admitting = key
        slot = self.policy.victim(self, guard, key[0], speculative)
        if slot is None:
            return None
        if slot.key is not None:
            on_evict(slot)
            del self.where[slot.key]
            self.layer_count[slot.key[0]] -= 1
            self.by_layer[slot.key[0]].discard(slot)
        else:
            self.filled = slot.index + 1
        self.layer_count[key[0]] = self.layer_count.get(key[0], 0) + 1
        self.by_layer.setdefault(key[0], set()).add(slot)
        slot.key, slot.state, slot.ready_chunks, slot.speculative = key, LOADING, 0, False
        self.where[key] = slot
        return slot

    # ---- what the compute thread and the predictor change (cv held), through these methods only ----
    def mark_needed(self, keys) -> None:
        """The experts the current layer uses: a precise request never evicts one of them."""
        self.needed = set(keys)
        if self.needed:
            self.layer_now = next(iter(self.needed))[0]

    def hold_layer(self) -> None:
        """The needed experts must be co-resident for one launch: none evicts another."""
        self.hold_needed = True

    def release_layer(self) -> None:
        """The layer has run: its experts are ordinary residents again."""
        self.needed = set()
        self.hold_needed = False

    def pin(self, slot: Slot) -> None:
        """The compute thread reads `slot` from now on (a use): it is not evicted until unpinned."""
        slot.pins += 1
        slot.speculative = False
        self.touch(slot)

    def unpin(self, slot: Slot, free_event=None) -> bool:
        """The compute thread is done with `slot` (its reads are queued before `free_event`, a device
        event a copy into the slot waits for); True when no one holds it any more."""
        if free_event is not None:
            slot.free_event = free_event
        slot.pins -= 1
        self.needed.discard(slot.key)
        return slot.pins == 0

    def expect(self, protect: set, expected: dict) -> None:
        """The predictor's view: `protect` (the next layer's predicted experts, safe from other guesses)
        and {key: step} experts valued as predicted until that step has run."""
        self.protected = protect
        for key, t_step in expected.items():
            self.predicted[key] = max(t_step, self.predicted.get(key, 0))

    def view(self, slot: Slot, offset: int, nbytes: int) -> torch.Tensor:
        return self.arena[slot.index, offset:offset + nbytes]

    def piece(self, slot: Slot, piece) -> torch.Tensor:
        """A host_store.Piece's bytes in `slot`."""
        return piece.view(self.arena.view(-1), slot.index * self.arena.shape[1])
