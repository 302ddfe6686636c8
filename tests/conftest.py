import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory):
    """Generated datasets go to a per-session folder, not the user's ~/.cache (spawned runs inherit it)."""
    os.environ["LIGHTNING_MUP_CACHE"] = str(tmp_path_factory.mktemp("dataset_cache"))


def pytest_runtest_setup(item):
    """Slow tests say their name as they start: the test command stays visibly alive through them."""
    if item.get_closest_marker("slow") is not None:
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[slow] {item.nodeid}")
