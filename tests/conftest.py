"""Session-wide fixtures live in tests/fixtures/*: one module per concern, registered here."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = [
    "tests.fixtures.tiny",
    "tests.fixtures.vllm_engine",
    "tests.fixtures.redis_server",
    "tests.fixtures.ray_local",
]
