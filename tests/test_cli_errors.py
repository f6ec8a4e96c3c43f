"""The CLI fails cleanly: one line on stderr, no traceback, a non-zero exit status."""
import errno
import os
import pathlib

import pytest
import torch

from sdq.cli import COMMANDS, main
from tiny_models import tiny_llama

T = pytest.importorskip("transformers")
torch.set_grad_enabled(False)


def one_line_error(capsys) -> str:
    """The error line; stderr may also hold the progress bar, never a traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("sdq ")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    return lines[0]


class _Tokenizer:
    def save_pretrained(self, path):
        pathlib.Path(path, "tokenizer.json").write_text("{}")


@pytest.fixture
def tiny_model(monkeypatch):
    """`sdq quantize` without a MODEL argument gets this tiny random Llama."""
    model = tiny_llama(vocab=64, intermediate=96, layers=1, tie=False, seed=0)
    monkeypatch.setattr("sdq.data.load_model", lambda *a, **kw: (model, _Tokenizer()))
    return model


QUICK = ["quantize", "--calib-samples", "0", "--eval-tokens", "0"]


@pytest.mark.parametrize("command", ["info", "eval"])
def test_nonexistent_folder(capsys, tmp_path, command):
    assert main([command, str(tmp_path / "nothing")]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"sdq {command}: error:") and "nothing" in err


def test_eval_of_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert main(["eval", str(tmp_path / "file")]) == 2
    assert "not a folder" in one_line_error(capsys)


@pytest.fixture
def unreadable(tmp_path, monkeypatch):
    """A folder whose config.json cannot be read (simulated: tests may run as root, who reads
    everything)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "config.json").write_text('{"quantization_config": {}}')
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if self.parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    return folder


@pytest.mark.parametrize("command", ["info", "eval"])
def test_unreadable_folder(capsys, unreadable, command):
    assert main([command, str(unreadable)]) == 1
    err = one_line_error(capsys)
    assert "config.json: Permission denied" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any folder")
@pytest.mark.parametrize("command", ["info", "eval"])
def test_folder_without_permissions(capsys, tmp_path, command):
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    folder.chmod(0)
    try:
        assert main([command, str(folder)]) == 1
    finally:
        folder.chmod(0o755)
    assert "Permission denied" in one_line_error(capsys)


def test_disk_full_during_save(capsys, tmp_path, monkeypatch, tiny_model):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("sdq.io.save_file", full)
    assert main([*QUICK, "--out", str(tmp_path / "q")]) == 1
    assert "No space left on device" in one_line_error(capsys)
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling


def test_strict_refuses_unquantizable_weights(capsys, tmp_path, tiny_model):
    tiny_model.model.layers[0].mlp.register_parameter(
        "fused", torch.nn.Parameter(torch.zeros(2, 8, 64)))
    assert main([*QUICK, "--strict", "--out", str(tmp_path / "q")]) == 2
    err = one_line_error(capsys)
    assert "strict" in err and "layer 0 mlp.fused" in err
    assert not (tmp_path / "q").exists()


def test_without_strict_the_skipped_weight_is_reported(capsys, tmp_path, tiny_model):
    tiny_model.model.layers[0].mlp.register_parameter(
        "fused", torch.nn.Parameter(torch.zeros(2, 8, 64)))
    assert main([*QUICK, "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "unsupported" in out and "model.layers.0.mlp.fused" in out and "--strict" in out


def test_runtime_error_is_one_line(capsys, monkeypatch):
    def fails(args):
        raise RuntimeError("kernel failed\n  while packing\n")

    monkeypatch.setitem(COMMANDS, "info", fails)
    assert main(["info", "x"]) == 1
    assert one_line_error(capsys) == "sdq info: error: kernel failed while packing"


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "info", interrupted)
    assert main(["info", "x"]) == 130
    assert capsys.readouterr().err == ""


def test_corrupt_saved_config_is_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text(
        '{"quantization_config": {"quant_method": "sdq", "format": "sdq-v1"}}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    assert main(["info", str(tmp_path)]) == 2
    one_line_error(capsys)
