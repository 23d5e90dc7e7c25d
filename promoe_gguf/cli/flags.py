"""What the subcommands' flags share: the parser (a usage error is one line and a hint to --help),
number types whose ranges come from `limits` (one definition for the CLI, the Python API and the
server), the model-running and sampling flags, and the flag that names each Engine setting in errors."""
from __future__ import annotations

import argparse
import math
import re

from .. import limits
from ..backends import FUSED_MAX_TOKENS
from ..runtime.placement import CPU_EXPERTS
from ..errors import ModelError, ParameterError, clip
from ..sampling import DEFAULTS

# The flag that sets each Engine / generate() / request setting, for errors raised past the parser.
FLAGS = {"n_threads": "--threads", "cpu_threads": "--cpu-threads", "n_ctx": "--n-ctx", "n_batch": "--n-batch",
         "max_tokens": "-n", "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
         "repeat_penalty": "--repeat-penalty", "seed": "--seed", "cache_rate": "--cache-rate",
         "cache_mem": "--cache-mem", "gpu_mem": "--gpu-mem", "link": "--link", "predictor": "--predictor",
         "policy": "--policy", "cpu_experts": "--cpu-experts", "device": "--device", "activations": "--activations",
         "kv_type": "--kv-type", "port": "--port", "max_queue": "--max-queue",
         "host": "--host"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one worth showing (not None / False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `promoe: error: FLAG ... (see 'promoe CMD --help')`, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:                       # reported by the subcommand's parser, so the hint names its --help
            subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            command = subs[0].choices.get(getattr(ns, subs[0].dest, None)) if subs else None
            (command or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns

    def error(self, message):
        m = re.fullmatch(r"argument ([^:]+): (.*)", message, re.S)
        if m:                                   # "argument --threads: must be ..." -> "--threads must be ..."
            flag, rest = m.group(1).split("/")[-1], m.group(2)
            message = f"{flag} {rest}" if rest.startswith("must ") else f"{flag}: {rest}"
        self.exit(2, f"promoe: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def setting(name: str):
    """argparse type for the setting `name` of limits.SETTINGS (its range checked as the Engine checks it)."""
    integer = limits.SETTINGS[name].get("integer", False)

    def parse(text: str):
        value = _parse_number(text, integer)
        try:
            return limits.check(name, value)
        except ParameterError as e:
            raise argparse.ArgumentTypeError(e.detail) from None
    parse.__name__ = "integer" if integer else "number"
    return parse


def ranged(lo=-math.inf, hi=math.inf, integer: bool = True, lo_open: bool = False, why: str = ""):
    """argparse type for a command's own numeric flag: a number in [lo, hi] (limits.number)."""
    def parse(text: str):
        try:
            return limits.number("value", _parse_number(text, integer), lo, hi, integer=integer, lo_open=lo_open,
                                 why=why)
        except ParameterError as e:
            raise argparse.ArgumentTypeError(e.detail) from None
    parse.__name__ = "integer" if integer else "number"
    return parse


def _parse_number(text: str, integer: bool):
    kind = "an integer" if integer else "a number"
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {clip(text)}") from None


def size(text: str) -> int:
    """argparse type: bytes with an optional K, M or G suffix (512M, 8G), > 0."""
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"must be a size of at least 1 byte such as 512M or 8G, "
                                         f"got {clip(text)}")
    return int(value)


def parse_mem(text, flag: str = "--cache-mem"):
    """A size flag's value (already parsed by `size`, or text) in bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    try:
        return size(text)
    except argparse.ArgumentTypeError as e:
        raise ModelError(f"{flag} {e}") from None


def add_cache_flags(p) -> None:
    """The flags every model-running command shares."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--cache-rate", type=setting("cache_rate"), default=None,
                   help="fraction of routed experts the GPU cache holds, in (0, 1]")
    p.add_argument("--cache-mem", type=size, default=None, help="GPU cache budget in bytes (suffixes K, M, G)")
    p.add_argument("--policy", default="lru", choices=("lru", "static", "promoe"),
                   help="cache replacement (with an expert cache)")
    p.add_argument("--predictor", default="none",
                   help="none | gate | mlp:PATH | history[:TRACE] | freq[:TRACE] (with an expert cache)")
    p.add_argument("--cpu-experts", default="auto", choices=CPU_EXPERTS,
                   help="with an expert cache: compute misses on the CPU when the cost model says it is faster "
                        f"than copying them (in prefill: misses with at most {FUSED_MAX_TOKENS} tokens in the step), splitting one "
                        "decode miss by rows so the CPU and the link finish together (auto); "
                        "the same with every miss whole on one side (whole); always (all); or copy every miss (off)")
    p.add_argument("--cpu-threads", type=setting("cpu_threads"), default=None,
                   help="ggml threads of the CPU expert pool (with an expert cache; default: --threads)")
    p.add_argument("--gpu-mem", type=size, default=None,
                   help="device memory to use (suffixes K, M, G): the expert cache gets what residents, KV cache "
                        "and workspace leave (CUDA default: free memory minus a margin)")
    p.add_argument("--link", default=None,
                   help="CPU emulation of the host-to-device link (with an expert cache): '25GB/s' (rate > 0) or "
                        f"'ratio=R' (0 < R <= {limits.LINK_RATIO_MAX:g}: the copy of one expert takes R x one "
                        "layer's decode compute)")
    p.add_argument("--n-ctx", type=setting("n_ctx"), default=None,
                   help="context length (KV cache size), at most the model's (default: that, at most 4096)")
    p.add_argument("--n-batch", type=setting("n_batch"), default=None,
                   help="prefill chunk size, 1 to --n-ctx (default 64, at most --n-ctx)")
    p.add_argument("--threads", type=setting("n_threads"), default=1,
                   help="CPU threads of ggml and torch, 1 to twice this machine's CPUs (the tiny default model "
                        "decodes fastest on one)")
    p.add_argument("--check-numerics", action="store_true",
                   help="check every layer's blocks for NaN/inf and name the first that produced one "
                        "(the logits are always checked; decoding then runs eagerly)")
    p.add_argument("--no-graphs", action="store_true",
                   help="CUDA: decode every step eagerly instead of replaying it as recorded device graphs "
                        "(the same kernels, bitwise the same logits)")
    p.add_argument("--activations", default=None, choices=("q8", "f32"),
                   help="CUDA: 8-bit activations and dp4a as llama.cpp's kernels (q8, default) or exact fp32")
    p.add_argument("--kv-type", default=None, choices=("f16", "f32"),
                   help="CUDA: KV cache element type (default f16, as llama.cpp's)")


def add_sampling_flags(p) -> None:
    """llama-server's sampling flags and defaults (sampling.DEFAULTS), as the server and the Python API."""
    p.add_argument("--temp", type=setting("temperature"), default=DEFAULTS["temperature"],
                   help="temperature, >= 0 (0: greedy)")
    p.add_argument("--top-k", type=setting("top_k"), default=DEFAULTS["top_k"], help="top-k (<= 0: off)")
    p.add_argument("--top-p", type=setting("top_p"), default=DEFAULTS["top_p"], help="top-p, in [0, 1] (1: off)")
    p.add_argument("--min-p", type=setting("min_p"), default=DEFAULTS["min_p"], help="min-p, in [0, 1] (0: off)")
    p.add_argument("--repeat-penalty", type=setting("repeat_penalty"), default=DEFAULTS["repeat_penalty"],
                   help="repeat penalty, > 0 (1: off)")
    p.add_argument("--repeat-last-n", type=setting("repeat_last_n"), default=DEFAULTS["repeat_last_n"],
                   help="tokens the repeat penalty looks back (-1: all, 0: off)")
    p.add_argument("--seed", type=setting("seed"), default=None, help="sampling seed (default: random)")


def sampling_args(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def engine_from_args(args, model=None):
    from ..engine import Engine
    if args.no_graphs and args.device == "cpu":
        import logging
        logging.getLogger("promoe").warning("--no-graphs: the CPU backend records no device graphs; every step "
                                            "runs eagerly anyway")
    if args.predictor == "oracle":
        raise ModelError("--predictor oracle replays a recorded routing of the same prompt: it exists for "
                         "benchmarks (Python API, routes=...), not the command line")
    return Engine(model if model is not None else args.model, device=args.device, cache_rate=args.cache_rate,
                  cache_mem=args.cache_mem, gpu_mem=args.gpu_mem, policy=args.policy, predictor=args.predictor,
                  link=args.link, n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=args.threads,
                  cpu_experts=args.cpu_experts, cpu_threads=args.cpu_threads, check_numerics=args.check_numerics,
                  graphs=not args.no_graphs, activations=args.activations, kv_type=args.kv_type)


def describe(e: ParameterError) -> str:
    """A ParameterError as the command line names it: the flag instead of the Python name."""
    flag, text = FLAGS.get(e.param), str(e)
    return flag + text[len(e.param):] if flag and text.startswith(e.param + " ") else text
