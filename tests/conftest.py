import os
import sys

import pytest
import torch

# Tests run on 2 CPU cores next to Ray worker processes: one intra-op thread per process avoids
# oversubscription (spinning OpenMP threads made small forwards 50x slower when cores were busy).
torch.set_num_threads(1)

# Ray Train's controller polls its workers every 2 s, and a worker's `ray.train.report` waits until
# the controller has collected the previous report: a toy run that checkpoints every other step spent
# ~8 of its ~45 s waiting on polls (the end of the run included). The heads and pipelines the tests
# start inherit this; real runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 0 and one intra-op thread for every test, whatever the previous test set (on a loaded
    2-core machine two threads spin-wait: ~50x slower small forwards)."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- process exit
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status once pytest is done, skipping the interpreter's teardown.

    A CI run passed every test, printed its summary, then died with SIGSEGV (never reproduced here;
    most likely while the interpreter finalized third-party native state: Ray's core worker, the
    daemon threads Ray Serve and Ray Data leave behind, torch). Nothing of this suite's is checked
    there, so the exit status is pytest's verdict alone. Run with MASKGIL_TEST_FULL_EXIT=1 to see
    the full teardown (with PYTHONFAULTHANDLER=1 a crash there prints its Python stacks)."""
    if os.environ.get("MASKGIL_TEST_FULL_EXIT") or _EXIT_STATUS not in config.stash:
        return
    if os.path.basename(sys.argv[0]) not in ("pytest", "py.test", "__main__.py"):
        return  # pytest.main() inside another program (an IDE, a notebook): not ours to end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])
