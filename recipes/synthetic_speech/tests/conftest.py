"""The recipe's tests share the library tests' helper modules (tone corpus, CTC emissions)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
