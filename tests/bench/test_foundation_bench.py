"""`dynenc bench --modes foundation` at tiny sizes (tiny WavLM / HuBERT configs, a few ms of
audio): its rows and ratios exist and are finite, its peers compute the same function, and
the peak-memory measurement sees what a step allocates."""
import json
import math

import pytest
import torch

from dynenc import bench
from dynenc.bench.figures import foundation
from dynenc.cli import main


def test_foundation_quick_rows_and_ratios(tmp_path, capfd):
    assert main(["bench", "--quick", "--no-progress", "--modes", "foundation", "--devices", "cpu",
                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["case"]: r for r in payload["rows"]}
    assert set(rows) == {case.name for case in bench.FIGURES["foundation"].cases(bench.QUICK)}
    assert {r["peer"] for r in rows.values()} == {"huggingface", "torchaudio", "dynenc"}
    for row in rows.values():
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row["case"]
    for f in bench.QUICK.fractions:
        active = rows[f"wavlm dynenc layers f={f:.2f}"]["info"]["active"]
        assert active == pytest.approx(f, abs=0.15)
    attention = {name: rows[f"wavlm attention {name}"]["info"] for name in foundation.ATTENTION}
    for info in attention.values():
        assert math.isfinite(info["peak_mb"]) and info["peak_mb"] > 0
    # HF's step holds its materialised [B*H, T, T] bias (and more); the fused op does not
    hf = attention["HF materialised bias"]
    assert hf["peak_mb"] >= hf["bias_mb"] > attention["dynenc fused bias"]["peak_mb"]

    ratios = {r["name"]: r for r in payload["ratios"]}
    assert set(ratios) == {ratio.name for ratio in bench.FIGURES["foundation"].ratios(bench.QUICK)}
    for ratio in ratios.values():
        assert math.isfinite(ratio["measured"]) and ratio["measured"] > 0, ratio["name"]
    for name in ("wavlm dynenc / HF eager", "hubert dynenc / HF eager", "wavlm layers f=0.50 / full",
                 "fused bias / HF materialised bias", "fused bias peak / no-bias peak"):
        assert ratios[name]["met"] in (True, False), name
    out, err = capfd.readouterr()
    assert "cpu:foundation attention" in out and "peak MB" in out
    assert err == "", err  # no warnings of HF, torchaudio's importer or torch.profiler's kineto


def test_foundation_peers_compute_the_same_function():
    """Same weights everywhere: on the longest utterance (no padding for HF's GroupNorm or
    torchaudio's unmasked WavLM to see) HF, torchaudio and dynenc agree; the three attention
    steps agree on every valid row."""
    workload = bench.Workload(bench.QUICK, torch.device("cpu"))
    waves, mask, lengths = foundation._audio(workload)
    longest = int(lengths.argmax())
    with torch.inference_mode(), foundation.hf_quiet():
        for name in foundation.MODELS:
            models = foundation._models(workload, name)
            expected = models.hf(waves, attention_mask=mask).last_hidden_state[longest]
            dynamic = models.dynenc(waves, attention_mask=mask).last_hidden_state[longest]
            torch.testing.assert_close(dynamic, expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(models.torchaudio(waves)[0][longest], expected, atol=1e-4, rtol=1e-4)

        inputs = foundation._attention_inputs(workload)
        fused = foundation._attention("dynenc fused bias")(workload).run()  # [N, H, Dh]
        arguments = (inputs["hf_attention"], inputs["hidden"], *inputs["padded"], inputs["position_bias"],
                     inputs["key_padding"])
        hf_out, _ = foundation.hf_materialised_attention(*arguments)  # [T * B, D]
        frames, batch = inputs["hidden"].shape[1], inputs["hidden"].shape[0]
        valid = ~inputs["key_padding"]
        hf_rows = hf_out.view(frames, batch, -1).transpose(0, 1)[valid]  # packed order: sample by sample
        torch.testing.assert_close(fused.reshape(fused.shape[0], -1), hf_rows, atol=1e-5, rtol=1e-4)
        sdpa = foundation.hf_bias_sdpa(*arguments)  # [B, H, T, Dh]
        torch.testing.assert_close(sdpa.transpose(1, 2).reshape(batch, frames, -1)[valid], hf_rows,
                                   atol=1e-5, rtol=1e-4)


def test_peak_bytes_follows_allocations_and_frees():
    def step():
        first = torch.ones(1 << 20)  # 4 MiB
        second = first * 2  # 8 MiB live
        del first
        third = second + 1  # 8 MiB live again
        return third.sum()

    peak = foundation.peak_bytes(step, torch.device("cpu"))
    assert 8 << 20 <= peak < (8 << 20) + (1 << 16)
