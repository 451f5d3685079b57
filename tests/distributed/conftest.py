"""Two-process (gloo, CPU) runs shared by the distributed tests."""
import sys
from pathlib import Path

# The tiny models and toy batches of the method tests (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "methods"))
