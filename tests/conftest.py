import os

import pytest
import torch

# Tests run on 2 CPU cores: keep intra-op threads bounded and results deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
