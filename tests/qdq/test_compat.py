"""A pytorch-quantization 2.x script runs after swapping its import for qdq."""

import textwrap

import torch

# Written the way pytorch-quantization's documented PTQ flow is written; only the
# import lines differ.
SCRIPT = textwrap.dedent('''
    import torch, torchvision
    from qdq import nn as quant_nn
    from qdq import quant_modules, calib
    from qdq.tensor_quant import QuantDescriptor

    quant_desc_input = QuantDescriptor(calib_method=CALIB_METHOD)
    quant_nn.QuantConv2d.set_default_quant_desc_input(quant_desc_input)
    quant_nn.QuantLinear.set_default_quant_desc_input(quant_desc_input)
    quant_modules.initialize()
    model = torchvision.models.resnet18()
    quant_modules.deinitialize()
    model.eval()

    def collect_stats(model, batches):
        for name, module in model.named_modules():
            if isinstance(module, quant_nn.TensorQuantizer):
                if module._calibrator is not None:
                    module.disable_quant()
                    module.enable_calib()
                else:
                    module.disable()
        with torch.no_grad():
            for image in batches:
                model(image)
        for name, module in model.named_modules():
            if isinstance(module, quant_nn.TensorQuantizer):
                if module._calibrator is not None:
                    module.enable_quant()
                    module.disable_calib()
                else:
                    module.enable()

    def compute_amax(model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, quant_nn.TensorQuantizer):
                if module._calibrator is not None:
                    if isinstance(module._calibrator, calib.MaxCalibrator):
                        module.load_calib_amax()
                    else:
                        module.load_calib_amax(**kwargs)

    collect_stats(model, [torch.randn(2, 3, 64, 64) for _ in range(2)])
    compute_amax(model, method="percentile", percentile=99.99)
    out = model(torch.randn(1, 3, 64, 64))
    amaxes = [m.amax for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
''')


def test_pytorch_quantization_script_runs_with_max():
    env = {"CALIB_METHOD": "max"}
    exec(SCRIPT, env)
    assert env["out"].shape == (1, 1000)
    assert all(a is not None for a in env["amaxes"])


def test_pytorch_quantization_names_exist():
    from qdq import calib, quant_modules
    from qdq import nn as quant_nn
    from qdq.tensor_quant import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor, fake_tensor_quant

    assert callable(quant_modules.initialize) and callable(quant_modules.deactivate)
    assert quant_nn.TensorQuantizer and calib.HistogramCalibrator and calib.MaxCalibrator
    assert QUANT_DESC_8BIT_PER_TENSOR == QuantDescriptor(num_bits=8)
    assert torch.equal(fake_tensor_quant(torch.zeros(2), torch.tensor(1.0)), torch.zeros(2))


def test_pytorch_quantization_script_runs_with_histogram_percentile():
    """The documented histogram flow: percentile amax at 99.99 for every input quantizer."""
    from qdq import calib
    from qdq import nn as quant_nn

    env = {"CALIB_METHOD": "histogram"}
    exec(SCRIPT, env)
    assert env["out"].shape == (1, 1000)
    assert all(a is not None and bool(torch.isfinite(a).all()) for a in env["amaxes"])
    inputs = [m for m in env["model"].modules() if isinstance(m, quant_nn.TensorQuantizer)
              and isinstance(m._calibrator, calib.HistogramCalibrator)]
    assert len(inputs) == 21   # 20 convs + fc of resnet18
    for q in inputs:
        expected = q._calibrator.compute_amax("percentile", percentile=99.99)
        assert torch.equal(q.amax, expected)
        assert 0 < float(q.amax) <= float(q._calibrator.max)
