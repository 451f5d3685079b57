"""``python -m recipes.synthetic_speech deploy``: a trained checkpoint measured as an edge user runs it.

For each budget (n layers, every other layer, final head: :class:`~dynenc.methods.LayerDropBudget`)
the fixed-budget graph is exported to ONNX (fp32 and a dynamic-int8 copy, :mod:`dynenc.export`)
and three runtimes — eager dynenc (:func:`~dynenc.methods.infer`), ONNX Runtime fp32 and ONNX
Runtime int8 — are measured on the test split:

* accuracy: greedy-CTC WER; against eager dynenc, the max |Δ log p| on valid frames and the
  fraction of utterances with the same greedy hypothesis;
* latency: batch 1, one utterance per call from fbank features (the model's front-end
  included, fbank itself not: it is the same for every runtime), on a fixed subset of
  utterances spread evenly over the lengths, for each thread count; the median per-utterance
  latency and the real-time factor (time / audio duration).

Writes ``deploy.json`` (rows + machine), ``deploy.md`` (a table) and ``deploy.png`` (latency
vs WER, one panel per thread count) to ``--out``, the ONNX files to ``--out/onnx``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from dynenc import export
from dynenc.asr import CTCModel, load_checkpoint
from dynenc.bench.figures.edge import layer_counts
from dynenc.bench.harness import machine_info
from dynenc.methods import LayerDropBudget, infer
from dynenc.routing import valid_frames
from dynenc.validation import check_int
from dynenc.asr.evaluate import greedy_transcripts, split_batches, word_error_rate
from dynenc.asr.features import FBANK_OPTIONS, load_split, torch_threads
from dynenc.asr.tokenizer import Tokenizer, load_tokenizer

#: ``(features [B, T, F], lengths [B]) -> (log_probs [B, T', V], lengths [B])`` on the CPU.
Runtime = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]
#: The runtimes, the reference (eager dynenc) first.
RUNTIMES = ("dynenc eager", "ort fp32", "ort int8")
#: Default budgets: these fractions of the model's L layers (as ``dynenc bench --modes edge``).
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
FRAME_SECONDS = FBANK_OPTIONS["frame_shift"] / 1000  # one fbank frame's hop


def check_budgets(budgets: Optional[Sequence[int]], num_layers: int) -> List[int]:
    """The distinct budgets (n layers) deepest first; the default :data:`FRACTIONS` of L."""
    if budgets is None:
        return layer_counts(num_layers, FRACTIONS)
    for n in budgets:
        check_int("--budgets (layers run)", n, low=1, high=num_layers)
    return sorted(set(budgets), reverse=True)


def export_onnx(model: CTCModel, layers: int, path: Path, max_frames: int) -> Dict[str, Path]:
    """``path`` (fp32) and ``path``'s ``.int8.onnx`` copy of the fixed-budget graph running
    ``layers`` every-other layers; ``{"fp32": path, "int8": int8 path}``."""
    (fp32,) = export.save(export.fixed_budget_graph(model, LayerDropBudget(layers)), path, max_frames)
    return {"fp32": fp32, "int8": export.quantize_int8(fp32, fp32.with_suffix(".int8.onnx"))}


def runtimes(model: CTCModel, layers: int, onnx_files: Dict[str, Path], threads: int) -> Dict[str, Runtime]:
    """The :data:`RUNTIMES` at the budget of ``layers`` every-other layers; ONNX Runtime
    sessions on ``threads`` intra-op threads (eager dynenc follows torch's thread count)."""
    budget = LayerDropBudget(layers)

    def eager(features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        result = infer(model, features, lengths, budget)
        return result.log_probs, result.lengths

    def onnx_runtime(path: Path) -> Runtime:
        session = export.onnx_session(path, threads)
        return lambda features, lengths: tuple(map(torch.from_numpy, export.run_onnx(session, features, lengths)))

    return {"dynenc eager": eager, "ort fp32": onnx_runtime(onnx_files["fp32"]),
            "ort int8": onnx_runtime(onnx_files["int8"])}


@torch.inference_mode()
def score(runs: Dict[str, Runtime], data: Sequence, tokenizer: Tokenizer) -> Dict[str, Dict[str, Optional[float]]]:
    """Per runtime of ``runs``: greedy ``wer`` on ``data`` (``[(features [T, F], text)]``) and,
    against the first runtime (the reference; None for it), ``max_abs_diff`` (max |Δ log p|
    over valid frames) and ``agreement`` (fraction of utterances with the same hypothesis)."""
    reference = next(iter(runs))
    references: List[str] = []
    hypotheses: Dict[str, List[str]] = {name: [] for name in runs}
    max_abs_diff = dict.fromkeys(runs, 0.0)
    for indices, features, lengths in split_batches(data, tokenizer):
        references += [data[i][1] for i in indices]
        outputs = {name: run(features, lengths) for name, run in runs.items()}
        expected, expected_lengths = outputs[reference]
        valid = valid_frames(expected_lengths, expected.shape[1])
        for name, (log_probs, out_lengths) in outputs.items():
            hypotheses[name] += [h.strip() for h in greedy_transcripts(log_probs.argmax(-1), out_lengths, tokenizer)]
            difference = float((log_probs - expected).abs().amax(-1)[valid].max())
            max_abs_diff[name] = max(max_abs_diff[name], difference)
    scores = {}
    for name in runs:
        same = sum(h == r for h, r in zip(hypotheses[name], hypotheses[reference])) / len(references)
        compared = name != reference
        scores[name] = {"wer": word_error_rate(references, hypotheses[name]),
                        "max_abs_diff": max_abs_diff[name] if compared else None,
                        "agreement": same if compared else None}
    return scores


def spread_by_length(lengths: Sequence[int], count: int) -> List[int]:
    """Indices of ``count`` items evenly spread over the order of ``lengths`` (shortest and
    longest included; the middle one for ``count == 1``; all of them when there are fewer)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if count >= len(order):
        return order
    if count == 1:
        return [order[len(order) // 2]]
    return [order[round(k * (len(order) - 1) / (count - 1))] for k in range(count)]


@torch.inference_mode()
def time_utterances(runs: Dict[str, Runtime], utterances: Sequence[Tensor]) -> Dict[str, List[float]]:
    """Seconds per utterance (``features [T, F]``, batch 1) of each runtime of ``runs``, after
    one warm-up call each. Round robin, every utterance through every runtime in turn, so the
    noise of a shared machine falls on the runtimes alike."""
    inputs = [(features[None], torch.tensor([features.shape[0]])) for features in utterances]
    for run in runs.values():
        run(*inputs[0])
    seconds: Dict[str, List[float]] = {name: [] for name in runs}
    for features, lengths in inputs:
        for name, run in runs.items():
            tic = time.perf_counter()
            run(features, lengths)
            seconds[name].append(time.perf_counter() - tic)
    return seconds


def measure(model: CTCModel, test: Sequence, tokenizer: Tokenizer, budgets: Sequence[int],
            thread_counts: Sequence[int], latency_utterances: int, onnx_dir: Path, progress: bool = True) -> Dict:
    """Every budget x runtime x thread count on ``test`` (``[(features [T, F], text)]``): the
    results dictionary of ``deploy.json`` (rows, the latency subset; no machine info)."""
    lengths = [features.shape[0] for features, _ in test]
    timed = [test[i][0] for i in spread_by_length(lengths, latency_utterances)]
    audio_seconds = sum(features.shape[0] for features in timed) * FRAME_SECONDS
    # A graph accepts inputs up to its max_frames: room for the longest test utterance.
    max_frames = max(export.MAX_FRAMES, max(lengths))
    rows = []
    with tqdm(total=len(budgets) * (2 + len(thread_counts)), desc="deploy", disable=not progress) as bar:
        for n in budgets:
            bar.set_postfix_str(f"n={n}: export")
            onnx_files = export_onnx(model, n, onnx_dir / f"n{n}.onnx", max_frames)
            bar.update()
            bar.set_postfix_str(f"n={n}: WER")
            with torch_threads(thread_counts[0]):
                scores = score(runtimes(model, n, onnx_files, thread_counts[0]), test, tokenizer)
            bar.update()
            for threads in thread_counts:
                bar.set_postfix_str(f"n={n}: latency, {threads} thread(s)")
                with torch_threads(threads):
                    seconds = time_utterances(runtimes(model, n, onnx_files, threads), timed)
                rows += [{"n": n, "executed_fraction": n / model.config.num_layers, "runtime": runtime,
                          "threads": threads, **scores[runtime],
                          "latency_ms": 1000 * statistics.median(seconds[runtime]),
                          "rtf": sum(seconds[runtime]) / audio_seconds} for runtime in RUNTIMES]
                bar.update()
    return {"num_layers": model.config.num_layers, "test_utterances": len(test), "budgets": list(budgets),
            "thread_counts": list(thread_counts), "latency_utterances": len(timed),
            "latency_audio_seconds": audio_seconds, "rows": rows}


NOTES = {
    "budget": "n of the model's L layers, every other layer, final head (LayerDropBudget(n)); executed_fraction n / L",
    "wer": "greedy CTC on the test split (the first --limit utterances), batches of up to 20000 frames",
    "max_abs_diff": "max |log p - eager dynenc's log p| over valid output frames (null for eager dynenc)",
    "agreement": "fraction of utterances whose greedy hypothesis equals eager dynenc's (null for eager dynenc)",
    "latency_ms": "median per-utterance time, batch 1, from fbank features (front-end included, fbank not), "
                  "after one warm-up call; runtimes timed round robin per utterance",
    "rtf": "summed time over the latency subset's summed audio duration (fbank frames x 10 ms)",
}


def _rows_by_key(results: Dict) -> Dict[Tuple[int, str, int], Dict]:
    return {(row["n"], row["runtime"], row["threads"]): row for row in results["rows"]}


def markdown(results: Dict) -> str:
    """One line per budget x runtime: WER, the int8 WER change over ORT fp32, latency and RTF
    per thread count (int8: and its speed-up over ORT fp32), the agreement with eager dynenc."""
    rows = _rows_by_key(results)
    threads = results["thread_counts"]
    header = (["budget (executed)", "runtime", "WER %", "int8 ΔWER (pts)"]
              + [f"{t} thread{'s' * (t > 1)}: ms (RTF)" for t in threads] + ["max \\|Δ log p\\|", "agreement"])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for n in results["budgets"]:
        for runtime in RUNTIMES:
            first = rows[n, runtime, threads[0]]
            fp32 = rows[n, "ort fp32", threads[0]]
            change = f"{100 * (first['wer'] - fp32['wer']):+.2f}" if runtime == "ort int8" else ""
            latencies = []
            for t in threads:
                row = rows[n, runtime, t]
                cell = f"{row['latency_ms']:.1f} ({row['rtf']:.3f})"
                if runtime == "ort int8":
                    cell += f", {rows[n, 'ort fp32', t]['latency_ms'] / row['latency_ms']:.2f}x"
                latencies.append(cell)
            difference = "" if first["max_abs_diff"] is None else f"{first['max_abs_diff']:.2g}"
            agreement = "" if first["agreement"] is None else f"{100 * first['agreement']:.1f} %"
            cells = [f"n={n} ({first['executed_fraction']:.2f})", runtime, f"{100 * first['wer']:.2f}", change,
                     *latencies, difference, agreement]
            lines.append("| " + " | ".join(cells) + " |")
    return (f"Test utterances: {results['test_utterances']}; latency: batch 1 over {results['latency_utterances']} "
            f"utterances ({results['latency_audio_seconds']:.1f} s of audio), median ms per utterance, RTF = time / "
            f"audio; int8 rows: speed-up over ORT fp32 after the RTF.\n\n" + "\n".join(lines) + "\n")


def plot(results: Dict, path: Path) -> None:
    """Latency vs WER, one line per runtime (a point per budget), one panel per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows_by_key(results)
    threads = results["thread_counts"]
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], threads):
        for runtime in RUNTIMES:
            points = [rows[n, runtime, t] for n in results["budgets"]]
            ax.plot([p["latency_ms"] for p in points], [100 * p["wer"] for p in points], "o-", label=runtime)
            for p in points:
                ax.annotate(f"n={p['n']}", (p["latency_ms"], 100 * p["wer"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(title=f"{t} thread{'s' * (t > 1)}, batch 1", xlabel="median latency per utterance (ms)",
               ylabel="test WER (%)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("python -m recipes.synthetic_speech deploy: latency vs WER per budget (n layers of "
                 f"{results['num_layers']}, every other)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a recipe checkpoint (runs/<method>/model.pt + its .json)")
    parser.add_argument("--data", type=Path, default=Path("data/speech"), help="corpus directory made by `python -m recipes.synthetic_speech data`")
    parser.add_argument("--budgets", type=int, nargs="+",
                        help="layers run (every other, final head); default L, 3L/4, L/2, L/4")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts timed (default 1 2)")
    parser.add_argument("--limit", type=int, help="score only the first N test utterances (default all)")
    parser.add_argument("--latency-utterances", type=int, default=40,
                        help="utterances timed at batch 1, spread evenly over the lengths (default 40)")
    parser.add_argument("--out", type=Path, default=Path("out/deploy"),
                        help="where deploy.json, deploy.md, deploy.png and onnx/ go")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    for n in args.threads:
        check_int("--threads", n, low=1)
    check_int("--latency-utterances", args.latency_utterances, low=1)
    if args.limit is not None:
        check_int("--limit", args.limit, low=1)
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    budgets = check_budgets(args.budgets, model.config.num_layers)
    tokenizer = load_tokenizer(args.data)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"{args.checkpoint} has {model.config.vocab_size} output units but the units of "
                         f"{args.data} are {tokenizer.vocab_size}: a checkpoint trained on another corpus?")
    test = load_split(args.data, "test", tokenizer=tokenizer)[:args.limit]
    if not test:
        raise ValueError(f"{args.data}: the test split is empty")
    machine = machine_info()  # before the work: its CPU-busy sample measures the other processes
    results = measure(model, test, tokenizer, budgets, list(dict.fromkeys(args.threads)), args.latency_utterances,
                      args.out / "onnx", progress=not args.quiet)
    results = {"checkpoint": str(args.checkpoint), "data": str(args.data), **results, "machine": machine,
               "notes": NOTES}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"json": args.out / "deploy.json", "md": args.out / "deploy.md", "png": args.out / "deploy.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    table = markdown(results)
    paths["md"].write_text(table)
    plot(results, paths["png"])
    print(table)
    print(f"wrote {', '.join(map(str, paths.values()))} and the ONNX files in {args.out / 'onnx'}")
    return 0
