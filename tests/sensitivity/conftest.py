import pytest

from qdqapp.evaluate import top1_accuracy
from tests.sensitivity.models import make_data, quantized_model


@pytest.fixture
def qmodel():
    return quantized_model()


@pytest.fixture(scope="session")
def test_data():
    return make_data(256, seed=3, batch=64)


@pytest.fixture
def eval_fn(test_data):
    return lambda m: top1_accuracy(m, test_data)


def sabotage(model, layer: str, factor: float = 0.02) -> None:
    """Clip one layer's input hard: its amax shrinks to ``factor`` of the calibrated one."""
    q = model.get_submodule(layer)._input_quantizer
    q.amax = q.amax * factor
