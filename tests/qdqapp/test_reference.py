import pytest
import torch

from qdqapp import reference as ref
from qdqapp.data import DEFAULT_ROOT, fashion_mnist

needs_data = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")


def test_architecture_has_residual_concat_bn_and_both_poolings():
    model = ref.build_reference_model()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "ConcatBlock",
            "BasicBlock", "Conv2d", "Linear"} <= kinds
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    # The graph holds the residual adds and the concat (torch.fx sees them as calls).
    graph = torch.fx.symbolic_trace(model).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert sum("add" in t for t in targets) == 2 and sum("cat" in t for t in targets) == 1
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_shipped_checkpoint_is_small_and_loads_in_eval_mode():
    assert ref.DEFAULT_CHECKPOINT.is_file()
    assert ref.DEFAULT_CHECKPOINT.stat().st_size < 2_000_000
    model = ref.load_reference_model()
    assert not model.training
    fresh = ref.build_reference_model()
    assert not torch.equal(model.fc.weight, fresh.fc.weight)


@needs_data
def test_shipped_checkpoint_classifies_real_test_images():
    model = ref.load_reference_model()
    x, y = fashion_mnist("test").tensors
    with torch.no_grad():
        acc = (model(x[:2000]).argmax(1) == y[:2000]).float().mean().item()
    assert acc > 0.75  # the full test set score is recorded in BENCHMARKS.md


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(ref.ReferenceCheckpointError, match="no such file"):
        ref.load_reference_model(tmp_path / "missing.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ref.DEFAULT_CHECKPOINT.read_bytes()[:5000])
    with pytest.raises(ref.ReferenceCheckpointError, match="cut.pt: cannot be read"):
        ref.load_reference_model(cut)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    with pytest.raises(ref.ReferenceCheckpointError, match="does not fit ReferenceNet"):
        ref.load_reference_model(other)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ref.ReferenceCheckpointError, match="not a state_dict"):
        ref.load_reference_model(tensor)
