"""Fast batch-1 generation: a static KV cache and a compiled one-token decode step.

HF `generate()` grows a dynamic cache and runs its logits processors, stopping criteria and
every module's Python around each token: at batch 1 on a CPU that is a large share of a decode
step, and it is the same for fp32 and sdq, which hides what the kernels save. `StaticDecoder` keeps transformers' `StaticCache`
(fixed-size key/value tensors updated in place), runs the prompt's forward (prefill) eagerly, and
runs every later token through one `torch.compile`d step whose shapes never change (so it compiles
once: `fullgraph=True, dynamic=False`). sdq's packed layers go into that graph as the custom ops of
`sdq.ops` (fake kernels for tracing; the ops' CPU kernels at run time), fp32 models as inductor's
own kernels, so the same path measures both.

    dec = StaticDecoder(model, max_cache_len=512)   # compile=None: time both steps, keep faster
    print(dec.warm_up().line())                     # compile seconds, kept out of tokens/s
    out = dec.generate(ids, max_new_tokens=64, eos_token_id=[2])
    out.tokens, out.stats.decode_tokens_per_s

Without a working C++ compiler (inductor's CPU backend needs one) the step runs eagerly, with the
reason in `WarmUp.reason`.
"""
from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

# torch.compile's mode for the step. "max-autotune-no-cudagraphs" also benchmarks GEMM templates
# while compiling (much longer compiles on 2 cores); `bench/generate.py --compile-modes
# default,max-autotune-no-cudagraphs` compares the two.
DEFAULT_MODE = "default"


class CacheFull(ValueError):
    """The prompt and the requested new tokens do not fit the decoder's static cache."""


@dataclass
class TokenTimes:
    """Where a reply's time went: the prompt's forward with the first new token (prefill), and
    the one-token steps after it (decode). Shared by StaticDecoder and `sdq generate`."""
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float  # the prompt's forward and the first new token
    decode_seconds: float  # every later token, one decode step each

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 \
            else float("inf")

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens/s of the one-token steps (None when only the first token was made)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


@dataclass
class DecodeStats(TokenTimes):
    compiled: bool


@dataclass
class WarmUp:
    """What warm_up() measured: the seconds of one decode step each way, the compile time."""
    compiled: bool  # the step generate() uses
    eager_step_seconds: float
    compiled_step_seconds: float | None = None
    compile_seconds: float | None = None
    reason: str = ""  # why the step is eager or compiled

    def line(self) -> str:
        step = "compiled" if self.compiled else "eager"
        parts = [f"eager step {1000 * self.eager_step_seconds:.1f} ms"]
        if self.compiled_step_seconds is not None:
            parts.append(f"compiled step {1000 * self.compiled_step_seconds:.1f} ms "
                         f"(compile {self.compile_seconds:.1f} s)")
        return f"decode step: {step} ({self.reason}; {', '.join(parts)})"


@dataclass
class Generation:
    tokens: torch.Tensor  # [1, prompt + new] like generate()'s output
    stats: DecodeStats
    new: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def compile_unavailable_reason() -> str | None:
    """Why torch.compile cannot build CPU kernels here (None: it can): inductor's CPU backend
    compiles C++ at run time, so a machine without a working compiler runs eagerly instead."""
    try:
        f = torch.compile(lambda x: x * 2 + 1, fullgraph=True, dynamic=False)
        if not torch.equal(f(torch.ones(3)), torch.full((3,), 3.0)):
            return "torch.compile gave a wrong result on a test function"
    except Exception as e:  # any failure here means: no compiled path on this machine
        return f"torch.compile does not work here ({type(e).__name__}: {_first_line(e)})"
    return None


def _compile_kwargs(mode: str | None) -> dict:
    """torch.compile's arguments for the step besides fullgraph and dynamic: the mode's inductor
    options (it takes a mode or options, not both) with the guard filter that skips the guards on
    the model's modules, and an isolated region (isolate_recompiles: dynamo keys compiled graphs
    on the code object, which every decoder's step shares, and without the module guards two
    models could then share one graph). A torch without both (older than 2.13) gets the mode
    alone: every guard checked, as before."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is None or "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        return {"mode": mode}
    from torch._inductor import list_mode_options
    options = dict(list_mode_options(mode or "default"))
    options["guard_filter_fn"] = skip
    return {"options": options, "isolate_recompiles": True}


def cache_class():
    from transformers import StaticCache
    return StaticCache


class StaticDecoder:
    """Greedy or sampled generation at batch 1 for a transformers causal LM (fp32 or with sdq
    layers), with a static cache of `max_cache_len` tokens reused across calls.

    compile: True compiles the decode step (an error when torch.compile cannot work here), False
    runs it eagerly, None times both at warm-up and keeps the faster (eager when torch.compile
    cannot work here; `warm.reason` says why). mode: torch.compile's mode for the step.

    The compiled step skips dynamo's guards on the model's modules
    (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`, torch 2.13+): checking them before
    every step cost 2.4 ms of a ~22 ms step on the default model. So it assumes the modules stay
    as they were at warm-up: writing new values into the weights in place is fine (sdq's plans
    see it), but after replacing, adding or reconfiguring modules build a new decoder.
    """

    def __init__(self, model, max_cache_len: int, compile: bool | None = None,
                 mode: str | None = DEFAULT_MODE):
        if max_cache_len < 3:  # warm-up times a prompt token and two steps
            raise ValueError(f"max_cache_len must be >= 3, got {max_cache_len}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_cache_len > limit:
            raise ValueError(f"max_cache_len {max_cache_len} exceeds the model's context of "
                             f"{limit} tokens")
        self.model = model
        self.max_cache_len = max_cache_len
        self.compile = compile
        self.mode = mode
        self.device = next(model.parameters()).device
        self.cache = cache_class()(config=model.config, max_cache_len=max_cache_len)
        # which cache slots hold tokens: without it, transformers drops the causal mask of a
        # one-token query, which would then attend to the cache's empty slots
        self._mask = torch.zeros(1, max_cache_len, dtype=torch.long, device=self.device)
        self._step = self._forward_step
        self.warm: WarmUp | None = None
        self._filled = 0  # tokens in the cache

    @property
    def compiled(self) -> bool:
        return self.warm is not None and self.warm.compiled

    # ------------------------------------------------------------------------- forwards
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _forward_step(self, ids: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """One token [1, 1] at position [1, 1] with the cache's slot mask [1, max_cache_len]: the
        logits [1, vocab]. The function that is compiled: its shapes never change."""
        return self._forward(ids, positions, mask)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        n = ids.shape[1]
        self._mask.zero_()
        self._mask[:, :n] = 1
        logits = self._forward(ids, torch.arange(n, device=self.device).unsqueeze(0), self._mask)
        self._filled = n
        return logits

    def _decode(self, token: int, step=None) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        positions = torch.tensor([[self._filled]], device=self.device)
        self._mask[0, self._filled] = 1
        logits = (step or self._step)(ids, positions, self._mask)
        self._filled += 1
        return logits

    def _time_steps(self, step, steps: int) -> float:
        """Seconds of the fastest of `steps` decode steps after a first, untimed one (which
        compiles a compiled step; its second call would show a recompile)."""
        self._prefill(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        self._decode(0, step)
        best = float("inf")
        for _ in range(steps):
            t0 = time.perf_counter()
            self._decode(0, step)
            best = min(best, time.perf_counter() - t0)
        return best

    def warm_up(self) -> WarmUp:
        """Time the eager step, compile and time the compiled one (unless compile=False), and
        choose the step generate() uses: compile=True the compiled one, None the faster one.
        The first generate() calls this when it was not called before."""
        steps = min(3, self.max_cache_len - 2)
        with torch.no_grad():
            eager = self._time_steps(self._forward_step, steps)
            warm = WarmUp(False, eager, reason="compile off")
            reason = None if self.compile is False else compile_unavailable_reason()
            if reason is not None:
                if self.compile:
                    raise RuntimeError(f"cannot compile the decode step: {reason}")
                warm.reason = reason
            elif self.compile is not False:
                warm = self._warm_compiled(warm, steps)
        self.cache.reset()
        self.warm = warm
        return warm

    def _warm_compiled(self, warm: WarmUp, steps: int) -> WarmUp:
        compiled = torch.compile(self._forward_step, fullgraph=True, dynamic=False,
                                 **_compile_kwargs(self.mode))
        t0 = time.perf_counter()
        try:
            self._prefill(torch.zeros(1, 1, dtype=torch.long, device=self.device))
            self._decode(0, compiled)
        except Exception as e:  # a compile failure: eager, unless compiling was demanded
            if self.compile:
                raise
            warm.reason = f"torch.compile failed: {type(e).__name__}: {_first_line(e)}"
            return warm
        warm.compile_seconds = time.perf_counter() - t0
        warm.compiled_step_seconds = self._time_steps(compiled, steps)
        faster = warm.compiled_step_seconds < warm.eager_step_seconds
        warm.compiled = bool(self.compile) or faster
        warm.reason = "compile on" if self.compile else "timed both ways, kept the faster"
        if warm.compiled:
            self._step = compiled
        return warm

    # ------------------------------------------------------------------------- generation
    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """CacheFull when the prompt and max_new_tokens do not fit the static cache."""
        # the last new token is never fed back, so the cache holds prompt + new - 1 tokens
        need = prompt_tokens + max_new_tokens - 1
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if need > self.max_cache_len:
            raise CacheFull(f"the prompt ({prompt_tokens} tokens) and max_new_tokens "
                            f"{max_new_tokens} need a cache of {need} tokens; this decoder's "
                            f"static cache holds {self.max_cache_len} (make one with a larger "
                            "max_cache_len)")

    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 eos_token_id: int | Iterable[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Continue `ids` [1, n] by up to max_new_tokens tokens (fewer when an eos token comes).

        temperature 0: greedy; > 0: sampled from softmax(logits / temperature) cut to the top_p
        nucleus, drawn with `generator` (seed it for reproducible samples). on_token(id) is
        called as each token is made (streaming)."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"ids must be [1, n] (batch 1), got {tuple(ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.check_fits(ids.shape[1], max_new_tokens)
        stop = _eos_set(eos_token_id)
        if self.warm is None:
            self.warm_up()
        ids = ids.to(self.device)
        new: list[int] = []
        with torch.no_grad():
            t0 = time.perf_counter()
            token = _pick(self._prefill(ids), temperature, top_p, generator)
            t1 = time.perf_counter()
            while True:
                new.append(token)
                if on_token is not None:
                    on_token(token)
                if token in stop or len(new) == max_new_tokens:
                    break
                token = _pick(self._decode(token), temperature, top_p, generator)
            t2 = time.perf_counter()
        tokens = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)
        stats = DecodeStats(ids.shape[1], len(new), t1 - t0, t2 - t1, self.compiled)
        return Generation(tokens, stats, new)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _eos_set(eos) -> set[int]:
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _pick(logits: torch.Tensor, temperature: float, top_p: float,
          generator: torch.Generator | None) -> int:
    """The next token from logits [1, vocab]: argmax, or a nucleus sample."""
    if temperature == 0:
        return int(logits[0].argmax())
    probs = torch.softmax(logits[0].float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
