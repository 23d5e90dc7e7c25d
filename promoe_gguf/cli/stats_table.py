"""`promoe run --stats`: the engine's statistics as a table one can read at a glance."""
from __future__ import annotations


def _kib(n) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _dispatch(st: dict) -> str:
    d = st.get("decode_dispatch")
    if not d or not d["tokens"]:
        return ""
    why = f" ({d['why_eager']})" if d.get("why_eager") else ""
    return (f"decode dispatch ({d['mode']}{why}): per token {d['replays_per_token']:.1f} graph replays, "
            f"{d['launches_outside_replays_per_token']:.1f} launches outside them, {d['host_syncs_per_token']:.1f} "
            f"host waits; host {d['host_us_per_layer']:.0f} us per layer")


def format_stats(st: dict) -> str:
    if "policy" not in st:
        return "\n".join(x for x in ("all experts resident on the device: no cache statistics", _dispatch(st)) if x)
    lines = [f"expert cache: {st['policy']} policy, predictor {st['predictor']}, {st['cache_slots']} slots x "
             f"{_kib(st['slot_bytes'])}, CPU experts {st.get('cpu_experts_mode', 'off')}; link: {st['link']}",
             f"{'layer':>6} {'hits':>6} {'misses':>6} {'on CPU':>6} {'copied':>6} {'stall s':>8} {'CPU wait s':>10}"]
    rows = list(st["per_layer"].items()) + [("total", st)]
    for name, r in rows:
        lines.append(f"{name:>6} {r['hits']:>6} {r['misses']:>6} {r.get('cpu_experts', 0):>6} {r.get('copies', 0):>6} "
                     f"{r['stall_s']:>8.3f} {r.get('wait_cpu_s', 0.0):>10.3f}")
    lookups = st["hits"] + st["misses"]
    lines.append(f"hit rate {st['hits'] / lookups if lookups else 0:.3f}; {_kib(st['bytes_h2d'])} copied; prefetches "
                 f"useful {st['prefetch_useful']}, wasted {st['prefetch_wasted']}; in the "
                 f"{st.get('decode_steps', 0)} decode steps timed (each up to the next's start: the last is not), "
                 f"waiting for copies {st.get('decode_wait_copy_share', 0):.1%}, for the CPU "
                 f"{st.get('decode_wait_cpu_share', 0):.1%} of their time")
    cm = st.get("cost_model")
    if cm:
        cpu = ", ".join(f"{sig} {gbs:g} GB/s" for sig, gbs in cm["cpu_GBps_1tok"].items())
        link = f"{cm['link_GBps']:g} GB/s" if cm["link_GBps"] else "unthrottled"
        lines.append(f"cost model: CPU {cpu} (one token); link {link}")
    if _dispatch(st):
        lines.append(_dispatch(st))
    return "\n".join(lines)
