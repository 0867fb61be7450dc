import pytest
import torch

# Tests run on 2 CPU cores next to Ray worker processes: one intra-op thread per process avoids
# oversubscription (spinning OpenMP threads made small forwards 50x slower when cores were busy).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 0 and one intra-op thread for every test, whatever the previous test set (on a loaded
    2-core machine two threads spin-wait: ~50x slower small forwards)."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
