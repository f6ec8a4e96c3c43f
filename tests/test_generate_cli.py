"""`sdq generate` on a tiny random Llama saved with sdq.save: streamed text, stats on stderr, the
chat template, stdin prompts, the chat loop, the dequantized path and clean errors.

The tokenizer is a byte-level one with no merges (every byte a token, so any text encodes) and a
ChatML template; the reference replies come from model.generate on hand-built prompts.
"""
import io
import json
import re

import pytest
import torch

import sdq
from sdq.cli import main
from tiny_models import tiny_llama

pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the eager decode step: compiling on 2 cores costs tens of seconds per run; the compiled step
# is checked once below and in tests/test_decode.py
GENERATE = ["generate", "--no-compile"]
STATS = re.compile(r"\[(\d+) new tokens in ([\d.]+) s: ([\d.]+|inf) tokens/s; "
                   r"prefill (\d+) tokens in ([\d.]+) s")


def byte_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[0],
                                  eos_token=SPECIALS[2], pad_token=SPECIALS[0])
    tok.chat_template = chat_template
    return tok


def save_tiny(folder, chat_template: str | None = CHATML, tokenizer: bool = True):
    tok = byte_tokenizer(chat_template)
    # initializer_range 0.3 (not 0.02): replies that depend on the prompt, not one repeated byte
    model = tiny_llama(vocab=len(tok), layers=1, seed=0, bos_token_id=0, eos_token_id=2,
                       pad_token_id=0, initializer_range=0.3)
    sdq.quantize_(model, sdq.SDQConfig(osr=2, levels="ternary"), progress=False)
    return sdq.save(model, folder, tok if tokenizer else None), tok


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gen") / "chat")


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gen") / "raw", chat_template=None)


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + \
        "<|im_start|>assistant\n"


def reference(folder, tok, text: str, new_tokens: int, dense: bool = False) -> tuple[str, int]:
    """(greedy reply, its token count) from model.generate on the prompt `text`."""
    model = sdq.load(folder)
    if dense:
        sdq.nn.set_max_kernel_tokens(model, 0)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), len(new)


def stats_of(err: str) -> list[tuple[int, int]]:
    """(new tokens, prompt tokens) of every stats line on stderr."""
    return [(int(m[1]), int(m[4])) for m in STATS.finditer(err)]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("sdq generate: error:"), err
    return err


def test_prompt_streams_the_greedy_reply_through_the_chat_template(chat_folder, capsys):
    folder, tok = chat_folder
    assert main([*GENERATE, str(folder), "--prompt", "héllo wörld",
                 "--max-new-tokens", "7"]) == 0
    out, err = capsys.readouterr()
    prompt = chatml(("user", "héllo wörld"))
    want, n = reference(folder, tok, prompt, 7)
    assert out == want + "\n"  # stdout: the reply only
    assert stats_of(err) == [(n, len(tok(prompt).input_ids))]
    assert "add-only kernels, eager decode step" in stats_line(err)
    assert "decode step: eager (compile off" in err  # the warm-up, printed apart


def test_compiled_decode_step_gives_the_same_reply(chat_folder, capsys):
    folder, tok = chat_folder
    assert main(["generate", str(folder), "--compile", "--prompt", "abc",
                 "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out == reference(folder, tok, chatml(("user", "abc")), 6)[0] + "\n"
    assert "decode step: compiled (compile on; eager step" in err
    assert "compiled decode step" in stats_line(err)


def stats_line(err: str) -> str:
    return next(line for line in err.splitlines() if STATS.match(line))


def test_system_message_and_raw_text(chat_folder, capsys):
    folder, tok = chat_folder
    assert main([*GENERATE, str(folder), "--prompt", "hi", "--system", "be brief",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == reference(
        folder, tok, chatml(("system", "be brief"), ("user", "hi")), 5)[0] + "\n"
    assert main([*GENERATE, str(folder), "--prompt", "once upon", "--no-chat-template",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == reference(folder, tok, "once upon", 5)[0] + "\n"


def test_tokenizer_without_template_gets_raw_text(raw_folder, capsys):
    folder, tok = raw_folder
    assert main([*GENERATE, str(folder), "--prompt", "abc", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == reference(folder, tok, "abc", 4)[0] + "\n"


def test_dequantized_runs_the_dense_path_only(chat_folder, capsys, monkeypatch):
    folder, tok = chat_folder

    def no_kernels(self, x):
        raise AssertionError("the add-only kernels ran with --dequantized")

    monkeypatch.setattr(sdq.SDQLinear, "_kernel_forward", no_kernels)
    assert main([*GENERATE, str(folder), "--prompt", "hello", "--max-new-tokens", "6",
                 "--dequantized"]) == 0
    out, err = capsys.readouterr()
    assert out == reference(folder, tok, chatml(("user", "hello")), 6, dense=True)[0] + "\n"
    assert "dequantized weights" in err and len(stats_of(err)) == 1


def test_prompt_from_stdin(chat_folder, capsys, monkeypatch):
    folder, tok = chat_folder
    monkeypatch.setattr("sys.stdin", io.StringIO("from a pipe"))
    assert main([*GENERATE, str(folder), "--prompt", "-", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == reference(
        folder, tok, chatml(("user", "from a pipe")), 4)[0] + "\n"


def test_sampling_is_reproducible_with_a_seed(chat_folder, capsys):
    folder, _ = chat_folder
    args = [*GENERATE, str(folder), "--prompt", "x", "--max-new-tokens", "12",
            "--temperature", "1.5", "--top-p", "0.9", "--seed"]
    outs = []
    for seed in ("3", "3"):
        assert main(args + [seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_chat_keeps_the_history_and_ends_on_exit(chat_folder, capsys, monkeypatch):
    folder, tok = chat_folder
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nworld\nexit\nnever read\n"))
    assert main([*GENERATE, str(folder), "--interactive", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    first, _ = reference(folder, tok, chatml(("user", "hello")), 5)
    second, _ = reference(folder, tok, chatml(("user", "hello"), ("assistant", first.strip()),
                                              ("user", "world")), 5)
    assert out == f"{first}\n{second}\n"
    assert len(stats_of(err)) == 2


def test_chat_reset_forgets_the_history(chat_folder, capsys, monkeypatch):
    folder, tok = chat_folder
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nworld\n"))  # ends on Ctrl-D
    assert main([*GENERATE, str(folder), "--interactive", "--max-new-tokens", "3"]) == 0
    second = reference(folder, tok, chatml(("user", "world")), 3)[0]
    assert capsys.readouterr().out.endswith(f"\n{second}\n")


def test_chat_ends_cleanly_on_ctrl_c_at_the_prompt(chat_folder, capsys, monkeypatch):
    folder, _ = chat_folder

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert main([*GENERATE, str(folder), "--interactive"]) == 0
    assert capsys.readouterr().out == ""


def test_ctrl_c_during_a_reply_stops_only_that_reply(chat_folder, capsys, monkeypatch):
    folder, tok = chat_folder
    import sdq.generate as gen
    real, calls = gen.generate_reply, []

    def first_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_reply", first_interrupted)
    monkeypatch.setattr("sys.stdin", io.StringIO("stopped\nworld\n"))
    assert main([*GENERATE, str(folder), "--interactive", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "[reply stopped]" in err
    assert out == reference(folder, tok, chatml(("user", "world")), 3)[0] + "\n"  # no history


def test_threads_sets_torch_threads_and_affinity(chat_folder, capsys, monkeypatch):
    folder, _ = chat_folder
    calls = {}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.setdefault("torch", n))
    monkeypatch.setattr("os.sched_setaffinity", lambda pid, cpus: calls.setdefault("cpus", cpus),
                        raising=False)
    assert main([*GENERATE, str(folder), "--prompt", "a", "--max-new-tokens", "1",
                 "--threads", "1"]) == 0
    assert calls["torch"] == 1 and len(calls.get("cpus", [0])) == 1
    assert "1 thread]" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--interactive"], "exclude each other"),
])
def test_bad_options(chat_folder, capsys, flags, message):
    folder, _ = chat_folder
    assert main([*GENERATE, str(folder), "--prompt", "x", *flags]) == 2
    assert message in one_line_error(capsys)


def test_no_prompt_without_a_terminal(chat_folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("text"))
    assert main([*GENERATE, str(chat_folder[0])]) == 2
    assert "--prompt" in one_line_error(capsys)


def test_empty_prompt(chat_folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(" \n"))
    assert main([*GENERATE, str(chat_folder[0]), "--prompt", "-"]) == 2
    assert "the prompt is empty" in one_line_error(capsys)


def test_prompt_longer_than_the_context(chat_folder, capsys):
    assert main([*GENERATE, str(chat_folder[0]), "--prompt", "x" * 3000]) == 2
    assert "exceed the model's context" in one_line_error(capsys)


def test_folders_that_are_not_sdq_folders(tmp_path, capsys):
    assert main([*GENERATE, str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such folder" in one_line_error(capsys)
    (tmp_path / "file").write_text("x")
    assert main([*GENERATE, str(tmp_path / "file"), "--prompt", "x"]) == 2
    assert "is not a folder" in one_line_error(capsys)
    assert main([*GENERATE, str(tmp_path), "--prompt", "x"]) == 2
    assert "not a saved sdq model folder" in one_line_error(capsys)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main([*GENERATE, str(hf), "--prompt", "x"]) == 2
    assert "is not an sdq" in one_line_error(capsys)


def test_folder_without_tokenizer(tmp_path, capsys):
    folder, _ = save_tiny(tmp_path / "q", tokenizer=False)
    assert main([*GENERATE, str(folder), "--prompt", "x"]) == 2
    assert "has no tokenizer" in one_line_error(capsys)
