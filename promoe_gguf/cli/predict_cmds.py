"""`promoe trace`, `promoe train-predictor`, `promoe eval-predictor`: routing traces and expert predictors.

    promoe trace MODEL --prompts FILE --out TRACE [--decode 32]
    promoe train-predictor TRACE --out PRED.pt [--window 3] [--ctx 3]
    promoe eval-predictor MODEL --trace TRACE --predictors gate,mlp:PRED.pt,history,freq [--json]
"""
from __future__ import annotations

import json
import sys

from ..errors import ModelError, ParameterError
from ..util import output_folder
from .flags import ranged, setting


def _model(path):
    from ..paths import DEFAULT_MODEL
    return DEFAULT_MODEL if path in (None, "default") else path


def _threads(n):
    if n:
        import torch
        torch.set_num_threads(int(n))


def cmd_trace(args) -> int:
    from ..engine import Engine
    from ..predict.trace import load_prompts, trace_prompts
    _threads(args.threads)
    output_folder(args.out, f"--out {args.out}")
    prompts = load_prompts(args.prompts)
    if args.max_prompts is not None:
        prompts = prompts[:args.max_prompts]
    eng = Engine(_model(args.model), n_ctx=args.n_ctx, n_batch=args.n_batch)
    try:
        out = trace_prompts(eng, prompts, args.out, n_decode=args.decode, temperature=args.temp, seed=args.seed,
                            progress=not args.quiet)
    finally:
        eng.close()
    meta = json.loads((out / "meta.json").read_text())
    t = meta["timing"]
    print(f"wrote {out}: {meta['rows']} tokens ({t['prefill_tokens']} prefill, {t['decode_tokens']} decode) "
          f"from {len(meta['sequences'])} prompts in {t['wall_s']:.1f} s")
    return 0


def cmd_train(args) -> int:
    from ..predict.mlp import train_predictor
    from ..predict.trace import Trace
    _threads(args.threads)
    output_folder(args.out, f"--out {args.out}")
    trace = Trace(args.trace)
    if args.model:
        from ..format import open_model
        trace.check_model(open_model(_model(args.model)))
    rec = train_predictor(trace, args.out, window=args.window, ctx=args.ctx, hidden=args.hidden, rank=args.rank,
                          target_x=not args.no_target_x, ema=args.ema, epochs=args.epochs, patience=args.patience,
                          batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, dropout=args.dropout,
                          seed=args.seed, max_rows=args.max_rows, progress=not args.quiet)
    tr = rec["train"]
    accs = tr["val_acc"]
    print(f"wrote {args.out}: window {rec['window']}, {len(accs)} (source -> target) MLPs, "
          f"{tr['epochs_run']} epochs on {tr['fit_rows']} tokens ({tr['fit_prompts']} prompts); "
          f"validation accuracy mean {sum(accs.values()) / len(accs):.4f}")
    for pair, a in accs.items():
        print(f"  {pair}: {a:.4f}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path
    from ..predict.evaluate import REQUIRED_KEYS, evaluate, format_table, markdown_table, plot, write_json
    _threads(args.threads)
    for flag, path in (("--out", args.out), ("--markdown", args.markdown), ("--png", args.png)):
        if path:
            output_folder(path, f"{flag} {path}")
    specs = [s.strip() for s in args.predictors.split(",") if s.strip()]
    try:
        report = evaluate(_model(args.model), args.trace, specs, lookahead=args.lookahead, link=args.link,
                          layer_time=args.layer_time, topk=args.topk, max_rows=args.max_tokens,
                          progress=not args.quiet)
    except ParameterError as e:
        if e.param != "predictor":
            raise
        raise ModelError(f"--predictors: {e.detail}") from None
    if args.out:
        write_json(report, args.out)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(report))
    png = plot(report, args.png)
    if args.json:
        rows = [{k: r[k] for k in r} for r in report["rows"]]
        assert all(all(k in r for k in REQUIRED_KEYS) for r in rows)
        json.dump(rows, sys.stdout, indent=1)
        print()
        print(f"wrote {png}" + (f", {args.out}" if args.out else ""), file=sys.stderr)
    else:
        print(format_table(report))
        print(f"wrote {png}" + (f", {args.out}" if args.out else ""))
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("trace", help="record per-token routing (router inputs, logits, chosen experts) to a trace")
    s.add_argument("model", help="GGUF file or converted cache directory ('default': the embedded model)")
    s.add_argument("--prompts", required=True, help="one prompt per line, or JSON lines with a \"prompt\" field "
                   "(and optionally \"split\": train|eval)")
    s.add_argument("--out", required=True, help="trace directory to create")
    s.add_argument("--decode", type=ranged(0), default=32, help="tokens to generate after each prompt, >= 0")
    s.add_argument("--temp", type=setting("temperature"), default=0.8, help="sampling temperature of the decoded tokens")
    s.add_argument("--seed", type=setting("seed"), default=0, help="sampling seed (prompt i uses seed + i)")
    s.add_argument("--max-prompts", type=ranged(1), default=None, help="trace only the first N prompts")
    s.add_argument("--n-ctx", type=setting("n_ctx"), default=None, help="context length (prompts are cut to fit the decode)")
    s.add_argument("--n-batch", type=setting("n_batch"), default=None,
                   help="prefill chunk size (default 64, at most --n-ctx)")
    s.add_argument("--threads", type=setting("n_threads"), default=None, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("train-predictor", help="train the learned (MLP) expert predictor on a trace")
    s.add_argument("trace", help="trace directory (promoe trace)")
    s.add_argument("--out", required=True, help="predictor file to write (.pt)")
    s.add_argument("--model", default=None, help="check that the trace belongs to this model")
    s.add_argument("--window", type=ranged(1, 3), default=3, help="predict the next 1..3 MoE layers")
    s.add_argument("--ctx", type=ranged(1, 64), default=3, help="router inputs of this many layers as features")
    s.add_argument("--hidden", type=ranged(1, 65536), default=128, help="MLP hidden width")
    s.add_argument("--rank", type=ranged(0, 65536), default=64, help="router-input encoder width (0: no encoder)")
    s.add_argument("--no-target-x", action="store_true", help="without the latest router input at the target layer")
    s.add_argument("--ema", type=ranged(0, 1, integer=False), default=0.8, help="decay of the routing-history average, in [0, 1]")
    s.add_argument("--epochs", type=ranged(1, 100_000), default=30, help="at most this many epochs")
    s.add_argument("--patience", type=ranged(1), default=3, help="early stopping: epochs without improvement")
    s.add_argument("--batch", type=ranged(1, 1 << 20), default=512, help="training batch (tokens)")
    s.add_argument("--lr", type=ranged(0, 10, integer=False, lo_open=True), default=2e-3, help="learning rate")
    s.add_argument("--weight-decay", type=ranged(0, 1, integer=False), default=1e-5, help="AdamW weight decay")
    s.add_argument("--dropout", type=ranged(0, 1, integer=False), default=0.0, help="dropout, in [0, 1]")
    s.add_argument("--seed", type=setting("seed"), default=0, help="training seed")
    s.add_argument("--max-rows", type=ranged(1), default=None, help="train on a random subset of this many tokens")
    s.add_argument("--threads", type=setting("n_threads"), default=None, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval-predictor", help="accuracy, recall, fetch rate and GOODPRED of predictors on "
                       "a trace's held-out prompts")
    s.add_argument("model", help="GGUF file or converted cache directory ('default': the embedded model)")
    s.add_argument("--trace", required=True, help="trace directory (its eval prompts are used)")
    s.add_argument("--predictors", default="gate,history,freq",
                   help="comma list of: none, gate, mlp:PATH, history, freq, oracle")
    s.add_argument("--lookahead", type=ranged(1, 3), default=3, help="distances 1..N (N <= 3)")
    s.add_argument("--link", default="25GB/s", help="host-to-device link for the fetch rate: a bandwidth "
                   "('25GB/s') or 'ratio=R' (one expert's copy takes R x one layer's decode compute)")
    s.add_argument("--layer-time", type=ranged(0, 10, integer=False, lo_open=True), default=None,
                   help="per-layer decode compute in seconds (default: measured from the Engine)")
    s.add_argument("--topk", type=ranged(1), default=None, help="experts predicted per target (default: the model's k)")
    s.add_argument("--max-tokens", type=ranged(1), default=None, help="evaluate at most this many held-out tokens")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.add_argument("--out", default=None, help="write the full report (rows, per-layer pairs, cost) as JSON")
    s.add_argument("--markdown", default=None, help="write the table as Markdown")
    s.add_argument("--png", default="eval-predictor.png", help="accuracy vs lookahead plot")
    s.add_argument("--threads", type=setting("n_threads"), default=None, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)
