"""Fuzzing sdq.load: a saved folder, damaged or crafted in many ways, either fails with a clear
error or gives a model that computes what it says it does.

One tiny Llama (two layers: one ternary, one binary; OSRs with block padding; attention biases)
is saved once. Each case copies its files, mutates them, and loads. The outcome must be:
  - CheckpointError (a ValueError; FileNotFoundError only for a missing file), never another
    exception type and never a crash; or
  - a model whose logits equal the original's through both the add-only kernels and the
    dequantized path; or, when the mutation changed the model's values in a self-consistent way
    (a finite scale, a flipped code), a model whose kernel and dequantized paths agree.
What must not happen is a silent difference: a model whose kernels compute something else than
its own dequantized weights say.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sdq
from sdq.io import CheckpointError
from sdq.nn import SDQLinear

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (after the importorskip)
from tiny_models import ternary_then_binary, tiny_llama  # noqa: E402

SEED = 20240611
CASES = 240
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.int32: torch.int32,
            torch.int8: torch.int8, torch.uint8: torch.uint8}


@dataclasses.dataclass
class Original:
    folder: Path
    tensors: dict[str, torch.Tensor]
    config: dict
    logits_kernel: torch.Tensor
    logits_dense: torch.Tensor


def _osr_for(layer: int, name: str) -> float:
    return 2.0 if name.endswith("v_proj") else 1.5 if "up" in name else 1.25


def _tiny_model() -> torch.nn.Module:
    """Layer 0 ternary, layer 1 binary; OSR 1.25 leaves block padding (m = 80 of 96 code columns
    for in = 64; 40 of 64 in down_proj's last block), 1.5 and 2 leave none."""
    return ternary_then_binary(tiny_llama(vocab=128, attention_bias=True), osr_for=_osr_for)


def _logits(model: torch.nn.Module, use_kernels: bool) -> torch.Tensor:
    for m in model.modules():
        if isinstance(m, SDQLinear):
            m.use_kernels = use_kernels
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The layers are tiny: one thread is faster than a pool, and never waits on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    torch.manual_seed(SEED)
    folder = sdq.save(_tiny_model(), tmp_path_factory.mktemp("fuzz") / "original")
    loaded = sdq.load(folder)
    levels = {m.config.levels for m in loaded.modules() if isinstance(m, SDQLinear)}
    assert levels == {"binary", "ternary"}
    return Original(folder, load_file(str(folder / "model.safetensors")),
                    json.loads((folder / "config.json").read_text()),
                    _logits(loaded, True), _logits(loaded, False))


# --- writing a mutated folder ----------------------------------------------------------------


def _write(folder: Path, original: Original, tensors=None, config=None,
           weights: bytes | None = None, rehash: bool = True) -> None:
    """A folder from the given tensors (or raw weights bytes) and config; rehash: put the new
    file's SHA-256 in config.json, so that the mutation reaches the checks behind the hash."""
    folder.mkdir()
    path = folder / "model.safetensors"
    if weights is not None:
        path.write_bytes(weights)
    else:
        save_file(tensors if tensors is not None else original.tensors, str(path))
    config = copy.deepcopy(config if config is not None else original.config)
    if rehash:
        config["quantization_config"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _pick(rng: np.random.Generator, items):
    items = sorted(items)
    return items[int(rng.integers(len(items)))]


def _flip_bit(t: torch.Tensor, index: int, bit: int) -> None:
    """Flip one bit of element `index` of t (contiguous) in place, through its integer view."""
    ints = t.view(INT_VIEW[t.dtype]).reshape(-1)
    nbits = t.element_size() * 8
    mask = 1 << bit
    if ints.dtype.is_signed and bit == nbits - 1:
        mask -= 1 << nbits  # the sign bit, as the negative number of that width
    ints[index] ^= mask


def _with(original: Original, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**original.tensors, key: t}


# --- the mutations: each writes `folder` and returns (description, must_fail) ----------------


def flip_bytes(original, folder, rng):
    data = bytearray((original.folder / "model.safetensors").read_bytes())
    for i in rng.integers(0, len(data), int(rng.integers(1, 4))):
        data[i] ^= int(rng.integers(1, 256))
    _write(folder, original, weights=bytes(data), rehash=False)
    return "bytes flipped in model.safetensors, old hash", True


def truncate(original, folder, rng):
    data = (original.folder / "model.safetensors").read_bytes()
    size = int(rng.integers(0, len(data)))
    _write(folder, original, weights=data[:size], rehash=bool(rng.integers(2)))
    return f"model.safetensors truncated to {size} bytes", True


def flip_bytes_rehashed(original, folder, rng):
    data = bytearray((original.folder / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    # Half the flips land in the JSON header (names, dtypes, offsets), half in the data.
    lo, hi = (0, header) if rng.integers(2) else (header, len(data))
    i = int(rng.integers(lo, hi))
    data[i] ^= int(rng.integers(1, 256))
    _write(folder, original, weights=bytes(data))
    return f"byte {i} of model.safetensors flipped, hash recomputed", False


def flip_config(original, folder, rng):
    text = bytearray((original.folder / "config.json").read_bytes())
    i = int(rng.integers(len(text)))
    # Mostly one low bit (stays ASCII, often stays valid JSON: a digit or a letter changes).
    text[i] ^= 1 << int(rng.integers(7)) if rng.integers(4) else int(rng.integers(1, 256))
    folder.mkdir()
    shutil.copy(original.folder / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_bytes(bytes(text))
    return f"byte {i} of config.json flipped", False


def flip_value_bit(original, folder, rng):
    key = _pick(rng, original.tensors)
    t = original.tensors[key].clone()
    index, bit = int(rng.integers(t.numel())), int(rng.integers(t.element_size() * 8))
    _flip_bit(t, index, bit)
    _write(folder, original, _with(original, key, t))
    return f"bit {bit} of element {index} of {key} flipped, hash recomputed", False


SPECIAL = (float("nan"), float("inf"), float("-inf"))


def set_value(original, folder, rng):
    key = _pick(rng, original.tensors)
    t = original.tensors[key].clone()
    flat = t.view(-1)
    index = int(rng.integers(t.numel()))
    must_fail = False
    if t.is_floating_point():
        if rng.integers(2):
            flat[index], must_fail = SPECIAL[int(rng.integers(3))], True
        else:
            flat[index] = float(rng.normal()) * float(t.abs().max())
    elif key.endswith(".hadamard_signs"):
        flat[index] = int(rng.integers(-128, 128))
        must_fail = int(flat[index]) not in (1, -1)
    elif t.dtype == torch.int32:  # a whole word of codes
        flat[index] = int(rng.integers(-2**31, 2**31))
    else:  # meta: one byte
        flat[index] = int(rng.integers(256))
    _write(folder, original, _with(original, key, t))
    return f"element {index} of {key} set to {flat[index].item()!r}", must_fail


def edit_meta(original, folder, rng):
    key = _pick(rng, [k for k in original.tensors if k.endswith(".meta")])
    t = original.tensors[key].clone()
    index = int(rng.integers(t.numel()))
    t[index] = int(rng.integers(32, 127))  # printable ASCII, same length
    _write(folder, original, _with(original, key, t))
    return f"byte {index} of {key} set to {chr(int(t[index]))!r}", False


def restructure(original, folder, rng):
    """A tensor missing, added, renamed, of another dtype or shape: always an error."""
    key = _pick(rng, original.tensors)
    t = original.tensors[key]
    tensors = dict(original.tensors)
    how = _pick(rng, ["drop", "add", "rename", "dtype", "shape"])
    if how == "drop":
        del tensors[key]
    elif how == "add":
        tensors[key.rpartition(".")[0] + ".extra"] = t.clone()
    elif how == "rename":
        tensors[key + "_"] = tensors.pop(key)
    elif how == "dtype":
        tensors[key] = t.double() if t.is_floating_point() else t.to(torch.int64)
    else:
        tensors[key] = t[:-1].clone() if t.shape[0] > 1 else t.reshape(1, -1).clone()
    _write(folder, original, tensors)
    return f"{key}: {how}", True


MUTATIONS = (flip_bytes, truncate, flip_bytes_rehashed, flip_config, flip_value_bit, set_value,
             flip_value_bit, set_value, edit_meta, restructure)


# --- the property ------------------------------------------------------------------------------


def _outcome(folder: Path, original: Original) -> str:
    """'error', 'identical' or 'consistent'; AssertionError on a silent difference."""
    try:
        model = sdq.load(folder)
    except (CheckpointError, FileNotFoundError) as e:
        assert str(e), "an error without a message"
        return "error"
    kernel, dense = _logits(model, True), _logits(model, False)
    if torch.equal(kernel, original.logits_kernel) and torch.equal(dense, original.logits_dense):
        return "identical"
    # A different model (a finite scale changed, a code flipped, a config value such as
    # rope_theta): it must still compute what its own dequantized weights say.
    scale = max(1.0, float(dense.abs().nan_to_num(posinf=0, neginf=0).max()))
    torch.testing.assert_close(kernel, dense, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)
    return "consistent"


def test_mutated_folders_fail_clearly_or_compute_what_they_say(original, tmp_path):
    counts = collections.Counter()
    for case in range(CASES):
        mutate = MUTATIONS[case % len(MUTATIONS)]
        rng = np.random.default_rng([SEED, case])
        description, must_fail = mutate(original, tmp_path / f"case{case}", rng)
        try:
            outcome = _outcome(tmp_path / f"case{case}", original)
        except Exception as e:
            raise AssertionError(f"case {case} ({mutate.__name__}: {description}): "
                                 f"{type(e).__name__}: {e}") from e
        assert outcome == "error" or not must_fail, (
            f"case {case} ({mutate.__name__}: {description}) was accepted")
        counts[mutate.__name__, outcome] += 1
        shutil.rmtree(tmp_path / f"case{case}")
    print("\nfuzz outcomes:", dict(sorted(counts.items())))
    total = collections.Counter()
    for (_, outcome), n in counts.items():
        total[outcome] += n
    # The cases must reach every outcome, else the fuzz exercises less than it claims.
    assert total["error"] and total["identical"] and total["consistent"], total
    assert counts["flip_value_bit", "error"] and counts["set_value", "error"], counts
