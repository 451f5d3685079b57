"""Model-level benchmarks: encoder forward (proportionality, padding), training step,
DLD step, early-exit / blank-skip inference — the cases of ``dynenc bench``."""
FIGURES = ("forward", "train", "dld", "exits")


def test_model(case, run_case):
    run_case(case)
