"""The synthetic-speech recipe: a multi-engine TTS corpus, the seed papers' protocols over
several seeds, the report and the deploy table (see README.md beside this file).

It uses dynenc as any user would (``dynenc.asr``, ``dynenc.methods``, ``dynenc.export``);
dynenc imports nothing from here.
"""
from pathlib import Path

#: This recipe's folder; its committed results live under ``results/``.
RECIPE_DIR = Path(__file__).resolve().parent
RESULTS_DIR = RECIPE_DIR / "results"
#: The current plan's report (``make recipe``): results.json, plan.json, results.md, the figure.
CURRENT_RESULTS = RESULTS_DIR / "v3"
