"""`sdq generate FOLDER`: talk to a saved sdq model, its tokens streamed as they are made.

One prompt (`--prompt TEXT`, or `--prompt -` to read it from stdin), or a chat (no `--prompt` and
stdin a terminal, or `--interactive`) that keeps the conversation through the tokenizer's chat
template. Replies go to stdout token by token; the speed (new tokens, seconds, tokens/s, prefill
and decode apart) goes to stderr, so stdout holds only the model's text. The packed layers compute
through the add-only kernels; `--dequantized` runs the same model through each packed layer's
dequantized weight (PackedLinear's dense path), for comparison.

Generation runs through sdq.decode.StaticDecoder: a static KV cache, the prompt's forward eager,
every later token through one compiled step (`--compile`), an eager one (`--no-compile`), or by
default whichever of the two was faster when both were timed at start-up.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .cli import CliError, _nonneg_int, _positive_float
from .decode import TokenTimes

EPILOG = """examples:
  sdq generate smollm2-sdq-t2 --prompt "What is the capital of France?"
  echo "Tell me a story" | sdq generate smollm2-sdq-t2 --prompt - --temperature 0.7 --seed 1
  sdq generate smollm2-sdq-t2            # a chat, when stdin is a terminal
  sdq generate smollm2-sdq-t2 --prompt "Hello" --dequantized   # dense path, for comparison

In a chat: 'exit', Ctrl-D or Ctrl-C at the prompt ends it; Ctrl-C during a reply stops that reply;
'/reset' forgets the conversation so far.

Speed: the decode step (one token through the model, with a static key/value cache) is compiled by
torch.compile once per run, before the first reply; the compile time is printed apart and is not
in tokens/s. Compiling needs a C++ compiler and takes a while (tens of seconds on 2 cores for
SmolLM2-135M; less when torch's compile cache already holds it); --no-compile starts at once."""


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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="--compile: run each new token through a torch.compile'd decode step "
                   "(compiled once at start-up; an error if torch.compile cannot work here); "
                   "--no-compile: the same step eagerly, no start-up cost. Default: compile when "
                   "possible, time a few steps both ways and keep the faster (eager, with the "
                   "reason, when torch.compile cannot work here, e.g. no C++ compiler)")


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
class Stats(TokenTimes):
    compute: str  # the packed layers' path, the decode step, the threads

    def line(self) -> str:
        decode = self.decode_tokens_per_s
        return (f"[{self.new_tokens} new tokens in {self.seconds:.2f} s: {self.tokens_per_s:.1f} "
                f"tokens/s; prefill {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s "
                f"({self.prefill_tokens_per_s:.0f} tokens/s)"
                + (f", decode {decode:.1f} tokens/s" if decode is not None else "")
                + f"; {self.compute}]")


def _streamer(tok):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """TextStreamer that writes to the current sys.stdout (pytest's capture swaps it)."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            sys.stdout.write(text + ("\n" if stream_end else ""))
            sys.stdout.flush()

    return Streamer(tok, skip_prompt=True, skip_special_tokens=True)


def sampling_kwargs(args, model, tok) -> dict:
    """StaticDecoder.generate's keyword arguments for the CLI's options."""
    eos = set()
    for e in (model.generation_config.eos_token_id, tok.eos_token_id):  # an id, a list or None
        eos.update(e if isinstance(e, list) else [] if e is None else [e])
    kw = {"max_new_tokens": args.max_new_tokens, "eos_token_id": sorted(eos)}
    if args.temperature == 0:
        return kw
    import torch
    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    return {**kw, "temperature": args.temperature, "top_p": args.top_p, "generator": generator}


def generate_reply(decoder, tok, ids, kwargs: dict, compute: str) -> tuple[str, Stats]:
    """Generate from `ids` [1, n], streaming the text to stdout; (reply text, stats)."""
    import torch
    streamer = _streamer(tok)
    streamer.put(ids)  # the prompt: skipped, but it tells the streamer where the reply starts
    try:
        out = decoder.generate(ids, on_token=lambda t: streamer.put(torch.tensor([t])), **kwargs)
    finally:
        streamer.end()
    s = out.stats
    stats = Stats(s.prompt_tokens, s.new_tokens, s.prefill_seconds, s.decode_seconds, compute)
    return tok.decode(out.new, skip_special_tokens=True), stats


# ----------------------------------------------------------------------------- the decoder
class Decoders:
    """The StaticDecoder for the model, rebuilt with a larger cache (and compiled again) when a
    conversation outgrows it. The cache is sized to what is asked, not to the model's whole
    context: every decode step attends over all of it."""

    def __init__(self, model, compile: bool | None):
        self.model, self.compile = model, compile
        self.decoder = None

    def get(self, tokens: int):
        """A decoder whose cache holds `tokens` tokens; the first one (and a rebuilt one) warms up
        here, its decode step's timing printed to stderr apart from the replies' speed."""
        from .decode import StaticDecoder
        if self.decoder is not None and self.decoder.max_cache_len >= tokens:
            return self.decoder
        limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        size = min(limit, max(256, 1 << (tokens - 1).bit_length()))  # doubling: few rebuilds
        self.decoder = StaticDecoder(self.model, size, compile=self.compile)
        print(f"[{self.decoder.warm_up().line()}; static cache {size} tokens]",
              file=sys.stderr, flush=True)
        return self.decoder


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
    kwargs = sampling_kwargs(args, model, tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    decoders = Decoders(model, args.compile)
    try:
        if chat:
            return _chat(decoders, tok, system, use_template, kwargs, threads, args)
        ids, _ = _fit_context(model, tok, [*system, {"role": "user", "content": prompt}],
                              use_template, args.max_new_tokens, drop_old=False)
        decoder = decoders.get(ids.shape[1] + args.max_new_tokens)
        text, stats = generate_reply(decoder, tok, ids, kwargs, _compute(args, decoder, threads))
        print(stats.line(), file=sys.stderr, flush=True)
        return {"text": text, "stats": stats}
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return {}


def _compute(args, decoder, threads: int) -> str:
    """How the reply was computed, for the stats line."""
    return (f"{'dequantized weights' if args.dequantized else 'add-only kernels'}, "
            f"{'compiled' if decoder.compiled else 'eager'} decode step, "
            f"{threads} thread{'s' if threads > 1 else ''}")


# a chat's first static cache: most conversations fit; a longer one rebuilds it (Decoders)
CHAT_CACHE_TOKENS = 1024


def _chat(decoders: Decoders, tok, system: list[dict], use_template: bool, kwargs: dict,
          threads: int, args) -> dict:
    """The interactive loop: one user message per line; the history is kept and re-sent through
    the chat template. Ends on 'exit'/'quit', end of input (Ctrl-D) or Ctrl-C at the prompt."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    how = "chat template" if use_template else "raw text, no chat template"
    model = decoders.model
    limit = getattr(model.config, "max_position_embeddings", None) or CHAT_CACHE_TOKENS
    compute = _compute(args, decoders.get(min(limit, CHAT_CACHE_TOKENS)), threads)
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
            decoder = decoders.get(ids.shape[1] + args.max_new_tokens)
            text, stats = generate_reply(decoder, tok, ids, kwargs, _compute(args, decoder,
                                                                             threads))
        except KeyboardInterrupt:  # this reply stops; the conversation goes on without it
            print("\n[reply stopped]", file=sys.stderr, flush=True)
            continue
        print(stats.line(), file=sys.stderr, flush=True)
        messages = [*kept, {"role": "assistant", "content": text.strip()}]
        replies += 1
