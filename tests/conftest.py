import pytest
import torch

# Tests run on 2 CPU cores next to Ray worker processes: one intra-op thread per process avoids
# oversubscription (spinning OpenMP threads made small forwards 50x slower when cores were busy).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
