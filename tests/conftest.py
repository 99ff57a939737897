import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Snakemake and DVC run `python` and `accelerate` from PATH: make that the interpreter running
# the tests, also when pytest is started as .venv/bin/python without activating the venv.
import os  # noqa: E402

os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("MPLBACKEND", "Agg")
