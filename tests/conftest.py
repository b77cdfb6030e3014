import os

import pytest
import torch

# Two threads per test process: the suite runs with pytest-xdist on 2-core machines.
torch.set_num_threads(int(os.environ.get("QDQ_TEST_THREADS", "1")))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
