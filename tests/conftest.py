import os
import sys

# tests/models.py is a helper module, not a package
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_shm():
    """DeepSpeed's CPU comm op leaves a 64 MiB /dev/shm buffer per rank of every run: remove
    the ones a test's runs created, or /dev/shm fills up over the suite (and runs then abort)."""
    from ds_chunk.ops import SHM_DIR, SHM_PREFIX

    listing = lambda: set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()  # noqa: E731
    before = listing()
    yield
    for name in listing() - before:
        if name.startswith(SHM_PREFIX):
            os.unlink(os.path.join(SHM_DIR, name))
