"""Quantization across 2 ranks (gloo, CPU) against one process: data-free bit for bit, calibrated
within float noise; the torchrun CLI path; a failing rank fails every rank, without a hang.

The ranks are separate processes: `torchrun` for the CLI, and for the API this file itself run
as a worker with the env:// variables torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import sdq
from sdq import distributed
from sdq.cli import main
from sdq.evaluate import perplexity
from sdq.pipeline import quantize_
from sdq.traversal import capture_layer_inputs, collect_hessians, decoder_layers, plan_layer
from tiny_models import tiny_llama

T = pytest.importorskip("transformers")
torch.set_grad_enabled(False)

VOCAB = 96
CONFIG = sdq.SDQConfig(osr=2, levels="ternary", codes="gram")  # uses the Hessians in every block
CALIB = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(1))  # 2 + 3
WINDOWS = torch.randint(0, VOCAB, (8 * 16,), generator=torch.Generator().manual_seed(2))
TESTS = Path(__file__).resolve().parent


def tiny_mixtral():
    """Fused experts (transformers 5): expert Hessians are reduced too, some experts see no
    token of one rank's share."""
    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                          num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                          bos_token_id=None, pad_token_id=None)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


MODELS = {"llama": lambda: tiny_llama(seed=0), "mixtral": tiny_mixtral}


# --- launching ranks -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(timeout_s: int = 120) -> dict:
    """The ranks import this sdq and these test helpers, on one thread each, over gloo; a rank
    waits at most timeout_s for another."""
    paths = [str(Path(sdq.__file__).resolve().parents[1]), str(TESTS), os.environ.get(
        "PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "OMP_NUM_THREADS": "1", "SDQ_DIST_BACKEND": "gloo",
            "SDQ_DIST_TIMEOUT": str(timeout_s)}


WAIT_S = 300  # for the ranks to finish: generous for a loaded CI machine


def _run_ranks(*argv: str, world: int = 2, timeout_s: int = 120
               ) -> list[subprocess.CompletedProcess]:
    """This file as a worker on `world` ranks, started as torchrun would start them; timeout_s
    is their process group's timeout. Output goes to files: a full pipe cannot block a rank."""
    port = _free_port()
    with contextlib.ExitStack() as stack:
        logs = [(stack.enter_context(tempfile.TemporaryFile("w+")),
                 stack.enter_context(tempfile.TemporaryFile("w+"))) for _ in range(world)]
        procs = [subprocess.Popen([sys.executable, __file__, *argv], text=True,
                                  stdout=out, stderr=err,
                                  env={**_env(timeout_s), "RANK": str(r), "LOCAL_RANK": str(r),
                                       "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)})
                 for r, (out, err) in enumerate(logs)]
        try:
            codes = [p.wait(timeout=WAIT_S) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for f in (f for pair in logs for f in pair):
            f.seek(0)
        return [subprocess.CompletedProcess(p.args, code, out.read(), err.read())
                for p, code, (out, err) in zip(procs, codes, logs)]


# --- the worker (python tests/test_distributed.py MODE OUT) --------------------------------


def _failing_osr_for(index: int, name: str) -> float:
    """Rank 1 fails in layer 1, while rank 0 waits in a collective."""
    if index == 1 and torch.distributed.get_rank() == 1:
        raise ValueError("injected failure on rank 1")
    return CONFIG.osr


def _layer0_hessians(out: str) -> None:
    """Each rank saves the layer-0 Hessians it owns after the reduction."""
    comm = distributed._Comm()
    model = tiny_llama(seed=0)
    layer = decoder_layers(model)[0]
    hidden, kwargs = capture_layer_inputs(model, distributed._share(CALIB, comm))
    linears = plan_layer(layer).linears
    tasks = distributed._layer_tasks(0, linears, {}, CONFIG, None)
    distributed._assign(tasks, comm.world)
    sums, counts = distributed._hessian_sums(layer, linears, {}, hidden, kwargs)
    owned = distributed._reduce_hessians(comm, tasks, sums, counts, set())
    torch.save(owned, f"{out}.hessians{comm.rank}")


def _worker(mode: str, out: str) -> None:
    with distributed.process_group():
        if mode == "calibrated":
            _layer0_hessians(out)
        results = {}
        for family in ("llama",) if mode == "fail" else MODELS:
            model = MODELS[family]()
            report = distributed.quantize_distributed(
                model, CONFIG, CALIB, progress=False,
                osr_for=_failing_osr_for if mode == "fail" else None)
            results[family] = {"state": model.state_dict(), "linears": report.linears}
        if distributed.is_main():
            torch.save(results, out)


# --- tests ---------------------------------------------------------------------------------


def test_assign_owners_is_greedy_longest_first_onto_the_least_loaded_rank():
    assert distributed.assign_owners([1, 5, 2, 5, 3], 2) == [1, 0, 1, 1, 0]  # loads 8 and 8
    assert distributed.assign_owners([4, 4, 4], 1) == [0, 0, 0]
    assert distributed.assign_owners([], 3) == []
    costs = [float(c) for c in torch.randint(1, 100, (40,), generator=torch.Generator()
                                             .manual_seed(0))]
    owners = distributed.assign_owners(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs)  # LPT never leaves a gap wider than one item


@pytest.mark.parametrize("gpus,local,expect", [(0, 2, "gloo"), (1, 2, "gloo"), (2, 2, "nccl"),
                                                (1, 1, "nccl"), (8, 4, "nccl")])
def test_backend_is_nccl_only_when_every_local_rank_has_its_own_gpu(monkeypatch, gpus, local,
                                                                     expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert distributed._backend() == expect
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", str(local))  # started without torchrun's local size
    assert distributed._backend() == expect
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")  # the user's choice wins
    assert distributed._backend() == "gloo"


def test_quantize_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        distributed.quantize_distributed(tiny_llama(layers=1), CONFIG)


@pytest.fixture(scope="module")
def two_rank_calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "calibrated.pt"
    ranks = _run_ranks("calibrated", str(out))
    for r, proc in enumerate(ranks):
        assert proc.returncode == 0, f"rank {r}: {proc.stderr[-3000:]}"
    return {**torch.load(out, weights_only=False), "path": out}


def test_hessians_reduced_to_owners_weigh_ranks_by_tokens(two_rank_calibrated):
    """Shares of 2 and 3 sequences: the owners' Hessians are 2/n sum x x^T over all 5."""
    path = two_rank_calibrated["path"]
    owned = [torch.load(f"{path}.hessians{r}") for r in range(2)]
    assert all(owned) and not set(owned[0]) & set(owned[1])  # both ranks own some, none twice
    model = tiny_llama(seed=0)
    layer = decoder_layers(model)[0]
    want = collect_hessians(layer, *capture_layer_inputs(model, CALIB))
    got = {**owned[0], **owned[1]}
    assert got.keys() == want.keys()
    for name, h in want.items():
        torch.testing.assert_close(got[name], h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(MODELS))
def test_calibrated_two_ranks_match_one_process(two_rank_calibrated, family):
    """Each rank holds 2 or 3 of the 5 sequences; the Hessians summed onto their owners weigh
    them by tokens: the model matches one process up to the float order of the sums."""
    single = MODELS[family]()
    report = quantize_(single, CONFIG, CALIB, progress=False)
    got = two_rank_calibrated[family]
    assert got["linears"] == report.linears and list(got["linears"]) == list(report.linears)
    logits_one = single(input_ids=WINDOWS.view(-1, 16)).logits
    ppl_one = perplexity(single, WINDOWS, seqlen=16, progress=False)
    data_free = MODELS[family]()
    quantize_(data_free, CONFIG, progress=False)
    single.load_state_dict(got["state"])
    logits_two = single(input_ids=WINDOWS.view(-1, 16)).logits
    ppl_two = perplexity(single, WINDOWS, seqlen=16, progress=False)
    assert abs(ppl_two / ppl_one - 1) < 0.005
    # Closer to one calibrated process than data-free quantization is: calibration was used.
    noise = (logits_two - logits_one).norm()
    assert noise < 0.1 * (data_free(input_ids=WINDOWS.view(-1, 16)).logits - logits_one).norm()


def test_a_failing_rank_fails_every_rank_without_a_hang(tmp_path):
    """Rank 0 learns of rank 1's failure from the lost connection, not from the process group
    timeout (set longer than WAIT_S: a hang would fail the test)."""
    ranks = _run_ranks("fail", str(tmp_path / "never.pt"), timeout_s=3600)
    assert [p.returncode != 0 for p in ranks] == [True, True]
    assert "injected failure on rank 1" in ranks[1].stderr
    assert "another rank stopped" in ranks[0].stderr
    assert not (tmp_path / "never.pt").exists()


def _tiny_folder(path: Path) -> Path:
    """A local Hugging Face folder: tiny Llama and a word-level tokenizer of its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    tiny_llama(seed=0, layers=3).save_pretrained(path)
    return path


def test_torchrun_cli_data_free_is_bit_identical_to_one_process(tmp_path, capsys):
    from safetensors.torch import load_file
    model = _tiny_folder(tmp_path / "model")
    args = ["quantize", str(model), "--calib-samples", "0", "--eval-tokens", "0", "--multi-osr"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "sdq", *args, "--out", str(tmp_path / "two")],
        env=_env(), text=True, capture_output=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1 and proc.stdout.count("bits/weight all-in") == 1
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "one", "two"]  # no temp left


if __name__ == "__main__":
    _worker(*sys.argv[1:])
