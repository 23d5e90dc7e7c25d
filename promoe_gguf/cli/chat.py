"""`promoe chat [MODEL]`: an interactive terminal chat with the model's chat template.

Replies stream to stdout; prompts, the status line (tokens/s, expert-cache hit rate) and command output go
to stderr, so stdout holds only the conversation. Commands: /reset, /stats, /quit (or end of input).
Ctrl-C stops a reply; Ctrl-C at the prompt quits. When the conversation outgrows the context, the oldest
exchanges are dropped (the system prompt stays).
"""
from __future__ import annotations

import json
import signal
import sys
import threading

from .. import api
from ..errors import ParameterError
from .flags import add_cache_flags, add_sampling_flags, engine_from_args, sampling_args, setting

HELP = "commands: /reset (forget the conversation), /stats (engine statistics), /quit"


def _status(gen: api.Generation, before: dict, after: dict) -> str:
    rate = gen.completion_tokens / gen.elapsed_s if gen.elapsed_s > 0 else 0.0
    hits = after.get("hits", 0) - before.get("hits", 0)
    misses = after.get("misses", 0) - before.get("misses", 0)
    hit_rate = f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "n/a (no expert cache)"
    return (f"[{gen.completion_tokens} tokens, {rate:.1f} tokens/s, expert cache hit rate {hit_rate}, "
            f"{gen.finish_reason}]")


def _stats_text(engine) -> str:
    stats = {k: v for k, v in engine.stats.items() if not isinstance(v, dict)}      # totals, not per layer
    prefill, decode = engine.timing.rates()
    stats.update(prefill_tokens=engine.timing.prefill_tokens, prefill_tokens_per_s=round(prefill, 1),
                 decode_tokens=engine.timing.decode_tokens, decode_tokens_per_s=round(decode, 1))
    return json.dumps(stats, indent=1, default=str)


class Chat:
    def __init__(self, engine, args, out=sys.stdout, err=sys.stderr):
        self.engine, self.args, self.out, self.err = engine, args, out, err
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.turns: list[dict] = []

    def prepare(self, user_text: str) -> api.Generation:
        """The next reply's generation; drops the oldest exchanges while the prompt does not fit."""
        sampling = sampling_args(self.args)
        self.turns.append({"role": "user", "content": user_text})
        while True:
            messages = self.system + self.turns
            try:
                return api.prepare_chat(self.engine, messages, max_tokens=self.args.n, **sampling)
            except api.InvalidRequest as e:
                if e.param == "max_tokens":  # less room left than -n: use what is left
                    return api.prepare_chat(self.engine, messages, max_tokens=None, **sampling)
                if e.param != "messages" or len(self.turns) <= 1:
                    self.turns.pop()
                    raise
                self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[-1:]
                print("(dropped the oldest exchange to fit the context)", file=self.err)

    def reply(self, user_text: str) -> None:
        try:
            gen = self.prepare(user_text)
        except ParameterError as e:
            print(f"error: {e}", file=self.err, flush=True)
            return
        before = self.engine.stats
        text = []
        # Ctrl-C during a reply cancels it at the next token: a KeyboardInterrupt raised anywhere could
        # land inside the expert cache's lock and leave it held
        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, lambda *_: gen.cancel.set())
        try:
            for piece in gen:
                text.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            gen.finish_reason = "interrupted"
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
        if gen.finish_reason == "cancelled":
            gen.finish_reason = "interrupted"
        self.out.write("\n")
        self.out.flush()
        self.turns.append({"role": "assistant", "content": "".join(text)})
        print(_status(gen, before, self.engine.stats), file=self.err, flush=True)

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        cmd = line.split()[0].lower()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.turns = []
            print("(conversation reset)", file=self.err, flush=True)
        elif cmd == "/stats":
            print(_stats_text(self.engine), file=self.err, flush=True)
        else:
            print(f"unknown command {cmd}; {HELP}", file=self.err, flush=True)
        return True

    def loop(self, stdin=sys.stdin) -> None:
        print(f"promoe chat: {self.engine.model_path} (n_ctx {self.engine.n_ctx}); {HELP}", file=self.err, flush=True)
        while True:
            self.err.write("> ")
            self.err.flush()
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                break
            if not line:  # end of input
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.reply(line)
        self.err.write("\n")


def chat(args) -> int:
    engine = engine_from_args(args)
    try:
        Chat(engine, args).loop()
    finally:
        engine.close()
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("chat", help="interactive terminal chat with the model's chat template")
    s.add_argument("model", nargs="?", default=None, help="GGUF file or cache directory (default: embedded model)")
    s.add_argument("--system", default=None, help="system prompt")
    s.add_argument("-n", type=setting("max_tokens"), default=256, help="most tokens per reply, >= 1")
    add_sampling_flags(s)
    add_cache_flags(s)
    s.set_defaults(func=chat)
