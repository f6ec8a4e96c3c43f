"""`sdq generate FOLDER`: talk to a saved sdq model, its tokens streamed as they are made.

One prompt (`--prompt TEXT`, or `--prompt -` to read it from stdin), or a chat (no `--prompt` and
stdin a terminal, or `--interactive`) that keeps the conversation through the tokenizer's chat
template. Replies go to stdout token by token; the speed (new tokens, seconds, tokens/s, prefill
and decode apart) goes to stderr, so stdout holds only the model's text. The packed layers compute
through the add-only kernels; `--dequantized` runs the same model through each packed layer's
dequantized weight (PackedLinear's dense path), for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import CliError, _nonneg_int, _positive_float

EPILOG = """examples:
  sdq generate smollm2-sdq-t2 --prompt "What is the capital of France?"
  echo "Tell me a story" | sdq generate smollm2-sdq-t2 --prompt - --temperature 0.7 --seed 1
  sdq generate smollm2-sdq-t2            # a chat, when stdin is a terminal
  sdq generate smollm2-sdq-t2 --prompt "Hello" --dequantized   # dense path, for comparison

In a chat: 'exit', Ctrl-D or Ctrl-C at the prompt ends it; Ctrl-C during a reply stops that reply;
'/reset' forgets the conversation so far."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `sdq quantize --out` or sdq.save")
    p.add_argument("--prompt", default=None,
                   help="the prompt; '-' reads it from stdin; omitted: a chat when stdin is a "
                   "terminal")
    p.add_argument("--interactive", action="store_true",
                   help="chat even when stdin is not a terminal (one message per line)")
    p.add_argument("--max-new-tokens", type=_nonneg_int, default=128,
                   help="most tokens to generate per reply (fewer when the model ends its reply)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (deterministic); > 0: sample with this temperature")
    p.add_argument("--top-p", type=_positive_float, default=1.0,
                   help="when sampling, draw from the smallest set of tokens whose probabilities "
                   "add up to this (nucleus sampling; 1: all tokens)")
    p.add_argument("--seed", type=_nonneg_int, default=None,
                   help="seed of the sampler (reproducible sampling); default: random")
    p.add_argument("--threads", type=_nonneg_int, default=None,
                   help="CPU cores to use (torch's threads, and the process is restricted to that "
                   "many cores, which bounds the add-only kernels' pool); default: all")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the raw text (in a chat: the transcript so far), not the tokenizer's "
                   "chat template (used by default when the tokenizer has one)")
    p.add_argument("--system", default=None,
                   help="system message put first in the chat template")
    p.add_argument("--dequantized", action="store_true",
                   help="compute through each packed layer's dequantized weight (dense matmuls) "
                   "instead of the add-only kernels: same model, for comparison")


def _check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise CliError("--max-new-tokens must be >= 1")
    if not args.temperature >= 0:  # also refuses nan
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.threads == 0:
        raise CliError("--threads must be >= 1")
    if args.prompt is not None and args.interactive:
        raise CliError("--prompt and --interactive exclude each other")


# ----------------------------------------------------------------------------- loading
def _check_folder(folder: Path) -> None:
    """A clear error for what is not a saved sdq folder with a tokenizer (load checks the rest)."""
    if not folder.exists():
        raise CliError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    from .io import read_quantization_config
    read_quantization_config(folder)  # "not a saved sdq model folder" / "not an sdq checkpoint"
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                       "tokenizer.model", "vocab.json")):
        raise CliError(f"{folder} has no tokenizer (save it with sdq.save(model, dir, tokenizer))")


def _limit_threads(threads: int | None) -> int:
    """Use `threads` cores: torch's thread count, and (Linux) the process's CPU affinity, which
    the core's kernel pool, sized by the hardware, inherits. Returns the threads in use."""
    import torch
    if threads is None:
        return torch.get_num_threads()
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:threads])
    torch.set_num_threads(threads)
    return threads


def load_for_generation(folder: Path, dequantized: bool = False):
    """(model, tokenizer) of a saved sdq folder, ready to generate: the packed layers compute
    through the add-only kernels, or with dequantized=True through their dequantized weights,
    built here so that the timings measure generation only."""
    import torch

    from .io import load
    from .packed_linear import PackedLinear, set_max_kernel_tokens
    _check_folder(folder)
    model, tok = load(folder, with_tokenizer=True)
    if dequantized:
        set_max_kernel_tokens(model, 0)  # every input has more than 0 tokens: the dense path
        for m in model.modules():
            if isinstance(m, PackedLinear):
                m.dense_weight()
    with torch.no_grad():  # warm-up: the kernels' thread pool and scratch start here
        model(input_ids=torch.zeros(1, 1, dtype=torch.long))
    return model, tok


# ----------------------------------------------------------------------------- prompts
def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_ids(tok, messages: list[dict], use_template: bool):
    """Token ids [1, n] of the conversation `messages` (role/content dicts, the last one the
    user's): through the chat template with the assistant's turn opened, or as the raw text of the
    turns one after the other (a system message first), for models without a template."""
    if use_template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    text = "\n".join(m["content"] for m in messages)
    return tok(text, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- one reply
@dataclass
class Stats:
    prompt_tokens: int
    new_tokens: int
    seconds: float
    prefill_seconds: float  # from the call to the first new token (the prompt's forward + 1 step)
    compute: str  # the packed layers' path, and the threads

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float | None:
        decode = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else None

    def line(self) -> str:
        decode = self.decode_tokens_per_s
        return (f"[{self.new_tokens} new tokens in {self.seconds:.2f} s: {self.tokens_per_s:.1f} "
                f"tokens/s; prefill {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s"
                + (f", decode {decode:.1f} tokens/s" if decode is not None else "")
                + f"; {self.compute}]")


def _streamer_class():
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """TextStreamer that writes to the current sys.stdout and notes when the first new token
        arrives (the end of prefill)."""

        first_token_at: float | None = None

        def put(self, value):
            if not self.next_tokens_are_prompt and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            sys.stdout.write(text + ("\n" if stream_end else ""))
            sys.stdout.flush()

    return Streamer


def sampling_kwargs(args, model, tok) -> dict:
    """generate()'s keyword arguments for the CLI's options."""
    eos = set()
    for e in (model.generation_config.eos_token_id, tok.eos_token_id):  # an id, a list or None
        eos.update(e if isinstance(e, list) else [] if e is None else [e])
    eos = sorted(eos)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    kw = {"max_new_tokens": args.max_new_tokens, "pad_token_id": pad,
          "eos_token_id": eos or None}
    if args.temperature == 0:
        return {**kw, "do_sample": False}
    return {**kw, "do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": 0}  # 0: no top-k cut, only --top-p


def generate_reply(model, tok, ids, kwargs: dict, compute: str) -> tuple[str, Stats]:
    """Generate from `ids` [1, n], streaming the text to stdout; (reply text, stats)."""
    import torch
    streamer = _streamer_class()(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    first = streamer.first_token_at
    stats = Stats(ids.shape[1], len(new), seconds, (first - t0) if first else seconds, compute)
    return tok.decode(new, skip_special_tokens=True), stats


# ----------------------------------------------------------------------------- the command
def _fit_context(model, tok, messages: list[dict], use_template: bool, max_new: int,
                 drop_old: bool):
    """The prompt ids, dropping the oldest exchanges (drop_old) when the conversation and the
    reply would not fit the model's context; CliError when the last message alone does not."""
    limit = getattr(model.config, "max_position_embeddings", None)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = prompt_ids(tok, messages, use_template)
        if limit is None or ids.shape[1] + max_new <= limit:
            return ids, messages
        if not drop_old or len(messages) - first <= 1:
            raise CliError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens "
                           f"{max_new} exceed the model's context of {limit} tokens")
        messages = messages[:first] + messages[first + 2:]  # the oldest user/assistant pair


def _read_prompt(args) -> str:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise CliError("the prompt is empty")
    return text


def run(args) -> dict:
    _check_args(args)
    chat = args.interactive or (args.prompt is None and sys.stdin.isatty())
    if args.prompt is None and not chat:
        raise CliError("no prompt: give --prompt TEXT, --prompt - (read stdin) or --interactive")
    prompt = None if chat else _read_prompt(args)
    threads = _limit_threads(args.threads)
    model, tok = load_for_generation(args.folder, args.dequantized)
    use_template = has_chat_template(tok) and not args.no_chat_template
    compute = (f"{'dequantized weights' if args.dequantized else 'add-only kernels'}, "
               f"{threads} thread{'s' if threads > 1 else ''}")
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    kwargs = sampling_kwargs(args, model, tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if chat:
            return _chat(model, tok, system, use_template, kwargs, compute, args)
        ids, _ = _fit_context(model, tok, [*system, {"role": "user", "content": prompt}],
                              use_template, args.max_new_tokens, drop_old=False)
        text, stats = generate_reply(model, tok, ids, kwargs, compute)
        print(stats.line(), file=sys.stderr, flush=True)
        return {"text": text, "stats": stats}
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return {}


def _chat(model, tok, system: list[dict], use_template: bool, kwargs: dict, compute: str,
          args) -> dict:
    """The interactive loop: one user message per line; the history is kept and re-sent through
    the chat template. Ends on 'exit'/'quit', end of input (Ctrl-D) or Ctrl-C at the prompt."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    how = "chat template" if use_template else "raw text, no chat template"
    print(f"sdq generate: chatting with {args.folder} ({compute}; {how}). 'exit', Ctrl-D or Ctrl-C "
          "ends; Ctrl-C during a reply stops it; '/reset' forgets the conversation.",
          file=sys.stderr, flush=True)
    messages = list(system)
    replies = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = input()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return {"replies": replies}
        line = line.strip()
        if line in ("exit", "quit"):
            return {"replies": replies}
        if line == "/reset":
            messages = list(system)
            continue
        if not line:
            continue
        try:
            ids, kept = _fit_context(model, tok, [*messages, {"role": "user", "content": line}],
                                     use_template, args.max_new_tokens, drop_old=True)
        except CliError as e:
            print(f"sdq generate: {e}", file=sys.stderr, flush=True)
            continue
        try:
            text, stats = generate_reply(model, tok, ids, kwargs, compute)
        except KeyboardInterrupt:  # this reply stops; the conversation goes on without it
            print("\n[reply stopped]", file=sys.stderr, flush=True)
            continue
        print(stats.line(), file=sys.stderr, flush=True)
        messages = [*kept, {"role": "assistant", "content": text.strip()}]
        replies += 1
