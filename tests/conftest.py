"""Session-wide fixtures live in tests/fixtures/*: one module per concern, registered here."""
import os
import tempfile

# One intra-op thread per process: test processes (engines, Ray workers, vLLM, redis) share 2 cores, and
# OpenMP threads spinning on a busy core made small ops 50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The test seam (phi3_model/seam.py) is on for the whole session, before any Ray or worker process starts, so
# every process inherits it; it does nothing until a test's `seam` fixture writes control files.
os.environ["PHI3_BATCH_TEST_SEAM"] = tempfile.mkdtemp(prefix="phi3-seam-")

pytest_plugins = [
    "tests.fixtures.tiny",
    "tests.fixtures.vllm_engine",
    "tests.fixtures.redis_server",
    "tests.fixtures.ray_local",
    "tests.fixtures.seam",
]


def pytest_unconfigure(config):
    import shutil
    shutil.rmtree(os.environ["PHI3_BATCH_TEST_SEAM"], ignore_errors=True)
