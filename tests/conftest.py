import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Snakemake and DVC run `python` and `accelerate` from PATH: make that the interpreter running
# the tests, also when pytest is started as .venv/bin/python without activating the venv.
import os  # noqa: E402

os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests that make throw-away git repositories need an identity, also on a bare CI machine.
for key, value in {"GIT_AUTHOR_NAME": "imgembed tests", "GIT_AUTHOR_EMAIL": "tests@imgembed.invalid",
                   "GIT_COMMITTER_NAME": "imgembed tests", "GIT_COMMITTER_EMAIL": "tests@imgembed.invalid"}.items():
    os.environ.setdefault(key, value)


import pytest  # noqa: E402


@pytest.fixture
def restore_logging():
    """main() points the imgembed logger at the test's stderr (or a log file); put it back afterwards."""
    import logging

    logger = logging.getLogger("imgembed")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def fresh_accelerate_state():
    """Tests that create Accelerators in this process start and leave accelerate's state empty."""
    from helpers import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()
