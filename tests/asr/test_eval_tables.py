"""``dynenc eval``'s tables: every method's WER at the same executed fractions."""
from dynenc.asr.evaluate import equal_compute_table


def _row(budget, executed, wer):
    return {"budget": budget, "executed_fraction": executed, "wer": wer}


def test_equal_compute_table_lines_methods_up_by_executed_fraction():
    results = {"methods": {
        "layer_drop": {"num_layers": 4, "rows": [_row("n=4", 1.0, 0.20), _row("n=2", 0.5, 0.40)]},
        "selector": {"num_layers": 4, "rows": [_row("k=2", 0.5, 0.30), _row("k=1", 0.25, 0.55)]},
        "early_exit": {"num_layers": 4, "rows": [_row("exit=2", 0.5, 0.35), _row("exit=4", 1.0, 0.21),
                                                 _row("max_prob thr=0.9", 0.51, 0.33)]},
    }}
    table = equal_compute_table(results).splitlines()
    assert table[2] == "| executed | layer_drop | selector | early_exit |"
    assert "| 4/4 | 20.0 |  | 21.0 |" in table
    assert "| 2/4 | 40.0 | 30.0 | 33.0 |" in table  # the best row within 0.02 of 2/4
    assert "| 1/4 |  | 55.0 |  |" in table
