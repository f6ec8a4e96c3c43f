"""sdq.finetune: end-to-end tuning of scales, means and norms against the full-precision model,
the codes frozen (tiny random Llama; quality on the real model is measured in bench/quality.py)."""
import copy
import functools

import pytest
import torch

import sdq
from sdq.finetune import _DenseSDQ, _TunableSDQLinear, finetune, teacher_topk
from sdq.finetune import _kl as kl_loss
from sdq.nn import SDQLinear
from tiny_models import tiny_llama

pytest.importorskip("transformers")

VOCAB = 96


@pytest.fixture(autouse=True)
def _grad_on():
    """Other test modules switch autograd off at import; training needs it."""
    with torch.enable_grad():
        yield


def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _models(levels):
    """(teacher, its quantized copy), built once per module run; tests take copies."""
    # a larger init than the default 0.02: logits far from uniform, so the KL has room to fall
    teacher = tiny_llama(vocab=VOCAB, seed=0, initializer_range=0.2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        sdq.quantize_(student, sdq.SDQConfig(osr=1, levels=levels, codes="gram"),
                      calibration=_calib(), progress=False)
    return teacher, student


def _teacher():
    return copy.deepcopy(_models("binary")[0])


def _student(teacher, levels="binary"):
    return copy.deepcopy(_models(levels)[1])


def _kl(model, teacher, ids):
    with torch.no_grad():
        return kl_loss(model(ids).logits, teacher(ids).logits).item()


def _packed_state(model):
    return {n: {k: v.clone() for k, v in m.state_dict().items()}
            for n, m in model.named_modules() if isinstance(m, SDQLinear)}


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_tuning_lowers_the_calibration_kl_and_changes_only_scales_means_norms(levels):
    teacher = _teacher()
    model = _student(teacher, levels)
    calib = _calib()
    packed = _packed_state(model)
    params = {k: v.clone() for k, v in model.named_parameters()}
    kl_before = _kl(model, teacher, calib)
    report = finetune(model, teacher, calib, steps=20, lr=5e-2, batch_size=4, progress=False)
    kl_after = _kl(model, teacher, calib)   # through the add-only kernels, fp16 values
    assert kl_after < 0.8 * kl_before
    assert len(report.losses) == 20 and report.teacher == "model"
    for name, state in _packed_state(model).items():
        assert state.keys() == packed[name].keys()
        for key, t in state.items():
            assert t.dtype == packed[name][key].dtype, (name, key)
            if key in ("scale", "mean"):
                assert not torch.equal(t, packed[name][key]), (name, key)
            else:  # codes, Hadamard signs, metadata: bit-identical
                assert torch.equal(t, packed[name][key]), (name, key)
    for name, p in model.named_parameters():
        assert p.dtype == params[name].dtype
        changed = not torch.equal(p, params[name])
        assert changed == name.endswith("norm.weight"), name


def test_topk_teacher_with_the_whole_vocabulary_is_the_full_kl():
    teacher = _teacher()
    calib = _calib()
    a, b = _student(teacher), _student(teacher)
    full = finetune(a, teacher, calib, steps=3, lr=1e-3, batch_size=2, progress=False)
    cached = teacher_topk(teacher, calib, k=VOCAB, progress=False)
    topk = finetune(b, cached, None, steps=3, lr=1e-3, batch_size=2, progress=False)
    assert topk.teacher == f"top-k={VOCAB}"
    assert topk.losses == pytest.approx(full.losses, rel=1e-4)


def test_topk_loss_is_the_kl_with_the_tail_as_one_outcome():
    """The top-k loss is KL(teacher || student) over the top k tokens plus one "tail" outcome:
    never negative, zero when the student equals the teacher, and equal to that coarse KL
    computed by hand."""
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(3, 5, 40, generator=gen) * 2
    student_logits = torch.randn(3, 5, 40, generator=gen) * 2
    logp = torch.log_softmax(teacher_logits, -1)
    top, idx = logp.topk(6, -1)
    loss = kl_loss(student_logits, (top, idx))
    p, q = logp.exp(), torch.softmax(student_logits, -1)
    p_k, q_k = p.gather(-1, idx), q.gather(-1, idx)
    coarse = (p_k * (p_k / q_k).log()).sum(-1) + (1 - p_k.sum(-1)) * (
        (1 - p_k.sum(-1)) / (1 - q_k.sum(-1))).log()
    assert float(loss) == pytest.approx(float(coarse.mean()), rel=1e-4)
    assert float(loss) > 0
    assert abs(float(kl_loss(teacher_logits, (top, idx)))) < 1e-6


def test_topk_teacher_lowers_the_kl():
    teacher = _teacher()
    model = _student(teacher)
    calib = _calib()
    kl_before = _kl(model, teacher, calib)
    finetune(model, teacher_topk(teacher, calib, k=8, progress=False), calib, steps=20,
                lr=5e-2, batch_size=4, progress=False)
    assert _kl(model, teacher, calib) < 0.8 * kl_before


def test_same_seed_same_curve_and_values_other_seed_differs():
    teacher = _teacher()
    calib = _calib()
    runs = []
    for seed in (3, 3, 4):
        model = _student(teacher)
        r = finetune(model, teacher, calib, steps=6, lr=5e-2, batch_size=2, seed=seed,
                        seq_len=16, schedule="constant", progress=False)
        runs.append((r.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert runs[0][0] != runs[2][0]


def test_saved_model_loads_with_the_tuned_outputs(tmp_path):
    teacher = _teacher()
    model = _student(teacher)
    calib = _calib()
    with torch.no_grad():
        untuned = model(calib).logits
    finetune(model, teacher, calib, steps=5, lr=5e-2, batch_size=4, progress=False)
    with torch.no_grad():
        tuned = model(calib).logits
    sdq.save(model, tmp_path / "m")
    loaded = sdq.load(tmp_path / "m")
    with torch.no_grad():
        again = loaded(calib).logits
    assert not torch.allclose(tuned, untuned, atol=1e-3)
    torch.testing.assert_close(again, tuned, rtol=0, atol=1e-5)


def test_dense_form_equals_the_packed_layer():
    model = _student(_teacher(), "ternary")
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(_TunableSDQLinear(layer, False)(x), layer(x),
                                   rtol=1e-4, atol=1e-4)


def test_dense_form_gradients():
    torch.manual_seed(0)
    out, n_in, bs = 3, 10, 4   # a ragged last block
    basis = torch.randn(out, n_in, dtype=torch.float64)
    mean_basis = torch.randn(1, n_in, dtype=torch.float64)
    args = [torch.randn(2, n_in, dtype=torch.float64), torch.randn(out, 3, dtype=torch.float64),
            torch.randn(out, 3, dtype=torch.float64), torch.randn(out, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda x, s, mu, b: _DenseSDQ.apply(x, s, mu, b, basis, mean_basis, bs), args)


def test_pipeline_argument_tunes_after_quantizing():
    teacher = _teacher()
    calib = _calib()
    plain, tuned = copy.deepcopy(teacher), copy.deepcopy(teacher)
    cfg = sdq.SDQConfig(osr=1, levels="binary", codes="gram")
    sdq.quantize_(plain, cfg, calibration=calib, progress=False)
    report = sdq.quantize_(tuned, cfg, calibration=calib, progress=False, finetune_steps=20,
                           finetune_lr=5e-2, finetune_seed=1)
    assert len(report.finetune["losses"]) == 20
    assert _kl(tuned, teacher, calib) < 0.9 * _kl(plain, teacher, calib)
    with pytest.raises(ValueError, match="calibration"):
        sdq.quantize_(copy.deepcopy(teacher), cfg, progress=False, finetune_steps=2)


def test_bad_arguments_raise_clearly():
    teacher = _teacher()
    model = _student(teacher)
    calib = _calib()
    bad = [(dict(steps=-1), "steps"), (dict(steps=1.5), "steps"), (dict(lr=0.0), "lr"),
           (dict(batch_size=0), "batch_size"), (dict(schedule="linear"), "schedule"),
           (dict(seq_len=1), "seq_len"), (dict(seq_len=64), "seq_len"),
           (dict(tokens=calib.float()), "LongTensor"), (dict(tokens=calib[0]), "LongTensor")]
    for kwargs, match in bad:
        kw = dict(tokens=calib, steps=2, progress=False) | kwargs
        with pytest.raises(ValueError, match=match):
            finetune(model, teacher, **kw)
    with pytest.raises(TypeError, match="teacher"):
        finetune(model, "teacher", calib, 2)
    with pytest.raises(ValueError, match="no SDQLinear"):
        finetune(copy.deepcopy(teacher), teacher, calib, 2, progress=False)
    cached = teacher_topk(teacher, calib, k=4, progress=False)
    with pytest.raises(ValueError, match="tokens differ"):
        finetune(model, cached, _calib(seed=1), 2, progress=False)
    with pytest.raises(ValueError, match="k must"):
        teacher_topk(teacher, calib, k=0)


def test_cli_refuses_what_finetune_cannot_serve(tmp_path, capsys):
    from sdq.cli import main
    folder = tmp_path / "hf"
    _teacher().save_pretrained(folder)
    for extra in (["--calib-samples", "0"], ["--method", "rtn", "--bits", "4"],
                  ["--method", "wgm"], [str(folder), "--streaming", "--out", str(tmp_path / "o")]):
        assert main(["quantize", "--finetune-steps", "2", *extra]) == 2, extra
        assert "--finetune-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: must be > 0
        main(["quantize", "--finetune-lr", "0"])
