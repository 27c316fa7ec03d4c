"""pytest set-up only: the repository root on sys.path, so that tests import the scripts and common/.
Helpers live in tests/helpers.py and tests/battery.py; no test module imports this file."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
