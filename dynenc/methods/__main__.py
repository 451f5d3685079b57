"""``python -m dynenc.methods``: the registered method names, one per line (for scripts and
shells); ``--describe`` adds each one's summary."""

import sys

from .registry import METHODS

for method in METHODS.values():
    print(f"{method.name}\t{method.summary}" if "--describe" in sys.argv[1:] else method.name)
