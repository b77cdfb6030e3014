"""QAT fine-tuning and quantized-model checkpoints on real (small) models and files."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qdq import qat
from qdq.replace import quantizers, replace_modules


def _calibrate(model, batches):
    model.eval()
    for _, q in quantizers(model):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for x in batches:
            model(x)
    for _, q in quantizers(model):
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
    return model


def _toy_problem(n=512, seed=0):
    """Four blob classes on 4x4 single-channel images: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 1, 4, 4, generator=g) * 1.5
    x = centers[y] + 0.5 * torch.randn(n, 1, 4, 4, generator=g)
    return x, y


def _toy_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 4))
    replace_modules(model)
    return model


def _loader(x, y, batch=64, shuffle=True):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(0))


def _accuracy(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def test_straight_through_training_learns_from_scratch():
    x, y = _toy_problem()
    model = _calibrate(_toy_model(), [x[:128]])
    before = _accuracy(model.eval(), x, y)
    res = qat.finetune(model, _loader(x, y), lambda m: _accuracy(m, x, y), epochs=3, lr=0.05,
                       progress=False)
    assert len(res.history) == 3 and res.initial_score == pytest.approx(before)
    assert res.best_score > 90.0 > before
    # Every quantizer stayed on during training: the score is that of the quantized model.
    assert all(q.is_quant_enabled for _, q in quantizers(model))
    assert _accuracy(model.eval(), x, y) == pytest.approx(res.best_score)


def test_learn_amax_moves_ranges_and_freeze_bn_keeps_statistics():
    x, y = _toy_problem()
    model = _calibrate(_toy_model(), [x[:128]])
    amax0 = {n: q.amax.clone() for n, q in quantizers(model)}
    bn = model[1]
    mean0 = bn.running_mean.clone()
    qat.finetune(model, _loader(x, y), lambda m: 0.0, epochs=1, lr=0.05, learn_amax=True,
                 freeze_bn=True, restore_best=False, progress=False)
    learned = [n for n, q in quantizers(model) if q.learn_amax]
    assert learned == ["0._input_quantizer", "4._input_quantizer"]  # per-tensor ones only
    assert all(isinstance(dict(quantizers(model))[n]._amax, nn.Parameter) for n in learned)
    assert any(not torch.equal(dict(quantizers(model))[n].amax, amax0[n]) for n in learned)
    assert torch.equal(bn.running_mean, mean0)
    # Without freezing, the statistics move.
    model2 = _calibrate(_toy_model(), [x[:128]])
    qat.finetune(model2, _loader(x, y), lambda m: 0.0, epochs=1, lr=0.05, restore_best=False,
                 progress=False)
    assert not torch.equal(model2[1].running_mean, mean0)


def test_best_checkpoint_kept_and_restored(tmp_path):
    x, y = _toy_problem()
    model = _calibrate(_toy_model(), [x[:128]])
    scores = iter([50.0, 80.0, 60.0])  # initial, epoch 1 (best), epoch 2
    seen = []

    def eval_fn(m):
        seen.append(copy.deepcopy(m.state_dict()))
        return next(scores)

    ckpt = tmp_path / "best.pt"
    res = qat.finetune(model, _loader(x, y), eval_fn, epochs=2, lr=0.05, checkpoint=ckpt,
                       progress=False)
    assert (res.best_epoch, res.best_score, res.checkpoint_writes) == (1, 80.0, 2)
    assert qat.load_checkpoint(_toy_model(), ckpt) == {"epoch": 1, "score": 80.0}
    # The model ends with the epoch-1 weights, which differ from the last epoch's.
    for key, value in model.state_dict().items():
        assert torch.equal(value, seen[1][key]), key
    assert not torch.equal(seen[1]["4.weight"], seen[2]["4.weight"])
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_run_resumes_from_saved_state(tmp_path):
    x, y = _toy_problem()
    ckpt = tmp_path / "best.pt"
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while evaluating epoch 2
        return float(len(calls))

    model = _calibrate(_toy_model(), [x[:128]])
    with pytest.raises(KeyboardInterrupt):
        qat.finetune(model, _loader(x, y), flaky, epochs=2, lr=0.05, checkpoint=ckpt,
                     progress=False)
    fresh = _calibrate(_toy_model(), [x[:128]])
    res = qat.finetune(fresh, _loader(x, y), lambda m: 10.0, epochs=2, lr=0.05,
                       checkpoint=ckpt, progress=False)
    assert res.resumed_from == 1
    assert [h[0] for h in res.history] == [1, 2]
    assert res.history[0][1] == 2.0 and res.best_epoch == 2


def test_checkpoint_round_trip_restores_amax_switches_and_learned_ranges(tmp_path):
    x, _ = _toy_problem()
    model = _calibrate(_toy_model(), [x[:128]])
    dict(quantizers(model))["4._weight_quantizer"].disable()
    dict(quantizers(model))["0._input_quantizer"].init_learn_amax()
    path = qat.save_checkpoint(model, tmp_path / "q.pt", note="x")
    rebuilt = _toy_model(seed=1)
    assert qat.load_checkpoint(rebuilt, path) == {"note": "x"}
    for (n, a), (_, b) in zip(quantizers(model), quantizers(rebuilt), strict=True):
        assert a.get_state() == b.get_state(), n
        assert a.learn_amax == b.learn_amax, n
        assert torch.equal(a._amax, b._amax), n
    assert isinstance(dict(quantizers(rebuilt))["0._input_quantizer"]._amax, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(model.eval()(x[:16]), rebuilt.eval()(x[:16]))
    # weights_only loading: the file holds nothing but tensors and plain values
    assert torch.load(path, weights_only=True)["format"] == qat.CHECKPOINT_FORMAT


def test_truncated_foreign_and_mismatched_checkpoints_give_one_clear_error(tmp_path):
    x, _ = _toy_problem()
    model = _calibrate(_toy_model(), [x[:128]])
    good = qat.save_checkpoint(model, tmp_path / "good.pt")
    raw = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(qat.CheckpointError, match="cut.pt.*cannot be read"):
        qat.load_checkpoint(_toy_model(), cut)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(qat.CheckpointError, match="plain.pt.*not a qdq"):
        qat.load_checkpoint(_toy_model(), plain)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(qat.CheckpointError, match="notes.pt"):
        qat.load_checkpoint(_toy_model(), text)
    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16, 4))
    replace_modules(other)
    with pytest.raises(qat.CheckpointError, match="good.pt does not fit"):
        qat.load_checkpoint(other, good)
    with pytest.raises(qat.CheckpointError, match="no such file"):
        qat.load_checkpoint(model, tmp_path / "missing.pt")


def _graph_signature(path):
    m = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output),
              sorted((a.name, onnx.helper.get_attribute_value(a).__repr__()) for a in n.attribute))
             for n in m.graph.node]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return nodes, inits


def test_model_rebuilt_from_checkpoint_exports_the_same_onnx(tmp_path):
    from export.onnx_export import to_onnx
    from qdqapp.reference import build_reference_model

    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    model = build_reference_model()
    replace_modules(model)
    _calibrate(model, [x])
    dict(quantizers(model))["fc._input_quantizer"].disable()
    path = qat.save_checkpoint(model, tmp_path / "q.pt")
    rebuilt = build_reference_model()
    replace_modules(rebuilt)
    qat.load_checkpoint(rebuilt, path)
    to_onnx(model.eval(), x[:1], tmp_path / "a.onnx", fold_bn=False)
    to_onnx(rebuilt.eval(), x[:1], tmp_path / "b.onnx", fold_bn=False)
    nodes_a, inits_a = _graph_signature(tmp_path / "a.onnx")
    nodes_b, inits_b = _graph_signature(tmp_path / "b.onnx")
    assert nodes_a == nodes_b
    assert sum(op == "QuantizeLinear" for op, *_ in nodes_a) > 10
    assert inits_a.keys() == inits_b.keys()
    for key in inits_a:
        np.testing.assert_array_equal(inits_a[key], inits_b[key], err_msg=key)
