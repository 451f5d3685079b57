"""Op micro-benchmarks: each native dynenc op against the eager torch compositions it
replaces, plus the routing step and one layer (routing overhead) — the cases of
``dynenc bench --modes ops``."""
FIGURES = ("ops",)


def test_op(case, run_case):
    run_case(case)
