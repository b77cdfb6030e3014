"""``qdq.compat``: pytorch-quantization scripts run unchanged, imports and all."""

import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

import qdq
import qdq.compat
from qdq.compat import MODULE_MAP, CompatError

ROOT = Path(__file__).resolve().parents[2]

# Written the way pytorch-quantization users write their PTQ scripts: its imports, the
# tutorial's initialize(), a float checkpoint, histogram calibration, ONNX export.
SCRIPT = textwrap.dedent('''
    import sys
    import torch, torchvision
    import pytorch_quantization
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization import quant_modules, calib
    from pytorch_quantization.tensor_quant import QuantDescriptor
    from pytorch_quantization.nn.modules.tensor_quantizer import TensorQuantizer

    out_path, ckpt = sys.argv[1], sys.argv[2]
    quant_desc_input = QuantDescriptor(calib_method="histogram")
    quant_nn.QuantConv2d.set_default_quant_desc_input(quant_desc_input)
    quant_nn.QuantLinear.set_default_quant_desc_input(quant_desc_input)
    quant_modules.initialize()
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(ckpt))            # "pretrained" float weights
    model.eval()

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            if module._calibrator is not None:
                module.disable_quant(); module.enable_calib()
            else:
                module.disable()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            if module._calibrator is not None:
                if isinstance(module._calibrator, calib.MaxCalibrator):
                    module.load_calib_amax()
                else:
                    module.load_calib_amax("percentile", percentile=99.99)
                module.enable_quant(); module.disable_calib()
            else:
                module.enable()

    with pytorch_quantization.enable_onnx_export():
        torch.onnx.export(model, torch.randn(1, 3, 64, 64), out_path, opset_version=13,
                          dynamo=False)
    print("exported", out_path)
''')


@pytest.fixture
def installed():
    qdq.compat.install()
    yield
    qdq.compat.uninstall()


def test_module_paths_answered_by_qdq_modules(installed):
    import pytorch_quantization
    import pytorch_quantization.utils as quant_utils
    from pytorch_quantization import tensor_quant
    from pytorch_quantization.nn.modules import quant_conv, tensor_quantizer

    assert tensor_quant is qdq.tensor_quant and tensor_quantizer is qdq.quantizer
    assert quant_conv.QuantConv2d is qdq.nn.QuantConv2d
    assert pytorch_quantization.nn.QuantLinear is qdq.nn.QuantLinear
    assert callable(quant_utils.reduce_amax)            # the function, not its submodule
    assert callable(pytorch_quantization.enable_onnx_export)
    from pytorch_quantization.nn._functions.quant_rnn import LSTMCell
    assert LSTMCell is qdq.nn.rnn.quant_lstm_cell
    for name in MODULE_MAP:                               # every mapped path imports
        __import__(name)


def test_uninstall_removes_every_name():
    qdq.compat.install()
    qdq.compat.uninstall()
    assert not any(name.startswith("pytorch_quantization") for name in sys.modules)
    with pytest.raises(ImportError):
        __import__("pytorch_quantization")


def test_never_shadows_a_real_pytorch_quantization(tmp_path):
    pkg = tmp_path / "pytorch_quantization"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    code = ("import qdq.compat, pytorch_quantization\n"
            "try:\n    qdq.compat.install()\nexcept qdq.compat.CompatError as e:\n"
            "    print('refused:', e)\n"
            "import pytorch_quantization as p; print('real' if p.REAL else 'alias')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "refused: a real pytorch_quantization is installed" in out.stdout
    assert out.stdout.strip().endswith("real")
    assert issubclass(CompatError, RuntimeError)


def test_unchanged_script_runs_through_python_m_qdq_compat(tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "float.pt")
    script = tmp_path / "ptq.py"
    script.write_text(SCRIPT)
    onnx_path = tmp_path / "r18.onnx"
    out = subprocess.run([sys.executable, "-m", "qdq.compat", str(script), str(onnx_path),
                          str(tmp_path / "float.pt")],
                         cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "2"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"exported {onnx_path}" in out.stdout
    graph = onnx.load(onnx_path).graph
    ops = [n.op_type for n in graph.node]
    # inputs and weights of 20 convs and the fc, inputs of the two pools
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 44

    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: np.random.rand(1, 3, 64, 64)
                        .astype(np.float32)})[0]
    assert y.shape == (1, 1000) and np.isfinite(y).all()


def test_python_m_qdq_compat_bad_script_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qdq.compat", str(tmp_path / "nope.py")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                              "PATH": ""})
    assert out.returncode == 2
    assert out.stderr.strip() == f"qdq.compat: no such script: {tmp_path / 'nope.py'}"
