"""Text and PNG output of simulations (every figure labelled as simulated)."""
from __future__ import annotations

from .profile import GiB


def _mb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.1f} MB"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def format_result(r: dict) -> str:
    mem = r.get("device_memory", {})
    lines = [
        f"SIMULATED, not measured: {r['model']} on profile {r['profile']}",
        f"routing   {r['routing']}" + ("" if r.get("routing_calibrated") is None else
                                        " [calibrated preset]" if r["routing_calibrated"] else
                                        " [Qwen3-30B-A3B's preset: no public trace for this model]"),
        f"engine    {r['engine']}: {r['mode']}" + (f"; device memory {mem['total'] / GiB:.2f} GiB" if mem.get("total") else ""),
        f"{'':22}{'decode':>12}{'prefill':>12}",
        f"{'tokens/s':22}{r['decode_tok_s']:>12.1f}{r['prefill_tok_s']:>12.1f}",
        f"{'decode bound':22}" + ("-".rjust(12) if r.get("decode_bound_tok_s") is None else
                                   f"{r['decode_bound_tok_s']:>12.1f}  (max(device bytes / its bandwidth, missed "
                                   f"bytes / (link + CPU bandwidth)); reached {r['decode_of_bound']:.0%})"),
    ]
    if r.get("decode_bound_layer_cost_tok_s"):
        lines.append(f"{'  with layer cost':22}{r['decode_bound_layer_cost_tok_s']:>12.1f}  (the device side plus "
                     f"the fixed per-layer cost; reached {r['decode_tok_s'] / r['decode_bound_layer_cost_tok_s']:.0%})")
    lines += [
        f"{'tokens':22}{r['decode_tokens']:>12}{r['prefill_tokens']:>12}",
        f"{'expert hit rate':22}{_pct(r['decode_hit_rate']):>12}{_pct(r['prefill_hit_rate']):>12}",
        f"{'waiting for copies':22}{_pct(r['decode_stall_share']):>12}{_pct(r['prefill_stall_share']):>12}",
        f"{'waiting for the CPU':22}{_pct(r['decode_cpu_wait_share']):>12}{'':>12}",
        f"{'experts on the CPU/tok':22}{r['decode_cpu_experts_per_token']:>12.2f}{r['prefill_cpu_experts_per_token']:>12.2f}",
    ]
    if r.get("decode_split_experts_per_token"):
        lines.append(f"{'split CPU+device/tok':22}{r['decode_split_experts_per_token']:>12.2f}{'':>12}")
    for link, label in (("h2d", "host->device /token"), ("cpu_read", "CPU reads /token"), ("gpu_read", "GPU reads /token")):
        lines.append(f"{label:22}{_mb(r['decode_bytes_per_token'][link]):>12}{_mb(r['prefill_bytes_per_token'][link]):>12}")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """Decode and prefill tok/s against device memory, one line per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    groups: dict = {}
    for r in rows:
        name = ("llama.cpp --n-cpu-moe" if r["engine"] == "llamacpp" else "FreeToken-like" if r["engine"] == "freetoken" else
                f"promoe {r['policy']}+{r['predictor']}, cpu-experts {r['cpu_experts']}")
        groups.setdefault(name, []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["device_gib"])
        style = "k--" if name.startswith("llama") else "-"
        for ax, key in zip(axes, ("decode_tok_s", "prefill_tok_s")):
            ax.plot([r["device_gib"] for r in rs], [r[key] for r in rs], style, marker="o", ms=3, label=name)
    for ax, what in zip(axes, ("decode", "prefill")):
        ax.set(xlabel="device memory used (GiB)", ylabel=f"{what} tokens/s (simulated)", title=f"{what} vs device memory")
        ax.grid(alpha=0.3)
    fig.suptitle(f"SIMULATED: {title}", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    fig.subplots_adjust(bottom=0.26, top=0.86)
    fig.savefig(path, dpi=100)
    plt.close(fig)
