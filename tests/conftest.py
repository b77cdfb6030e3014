import os

import pytest
import torch

# One thread per test process: the suite runs with pytest-xdist on 2-core machines.
torch.set_num_threads(int(os.environ.get("QDQ_TEST_THREADS", "1")))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_default_descriptors():
    """Tests that call ``set_default_quant_desc_*`` (as user scripts do) must not change the
    defaults seen by later tests in the same process."""
    from qdq.nn.mixin import QuantInputMixin

    def classes(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from classes(sub)

    saved = [(cls, name, cls.__dict__[name]) for cls in {QuantInputMixin, *classes(QuantInputMixin)}
             for name in ("default_quant_desc_input", "default_quant_desc_weight")
             if name in cls.__dict__]
    yield
    for cls in {QuantInputMixin, *classes(QuantInputMixin)}:
        for name in ("default_quant_desc_input", "default_quant_desc_weight"):
            if name in cls.__dict__ and (cls, name, cls.__dict__[name]) not in saved:
                delattr(cls, name)
    for cls, name, value in saved:
        setattr(cls, name, value)
