"""``python -m recipes.synthetic_speech <command>``: the synthetic-speech recipe's commands,
with dynenc's error policy (one-line user errors, exit 2; ``--debug`` for the traceback)."""
from typing import List, Optional

from dynenc import cli

COMMANDS = {
    "data": ("recipes.synthetic_speech.data", "synthesise the multi-engine speech corpus and prepare it"),
    "run": ("recipes.synthetic_speech.reproduce", "reproduce the seed papers' claims: every protocol x seed, "
            "resumable"),
    "report": ("recipes.synthetic_speech.report", "regenerate results.md and its figure from results.json"),
    "deploy": ("recipes.synthetic_speech.deploy", "WER and batch-1 latency per budget on the CPU: eager vs ORT "
               "fp32/int8"),
}

PROG = "python -m recipes.synthetic_speech"


def main(argv: Optional[List[str]] = None) -> int:
    return cli.main(argv, commands=COMMANDS, prog=PROG,
                    description="The synthetic-speech recipe: corpus, protocols x seeds, report, deploy table.")
