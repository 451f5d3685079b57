"""``dynenc eval``: sweep each trained method's budgets on the test split and report WER vs
executed compute (fraction of full-depth token x layers) and measured CPU inference time,
as JSON, a PNG plot (all methods on one figure) and a markdown report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jiwer
import torch
from torch import Tensor
from tqdm import tqdm

from ..methods import Budget, FullBudget, get_method, infer, method_names
from ..routing import valid_frames
from ..validation import check_int, check_real
from .batching import SpeechBatches, collate_batch
from .checkpoint import find_checkpoint, load_checkpoint
from .ctc_model import CTCModel
from .features import ROWS_PER_FRAME, load_split
from .tokenizer import Tokenizer, load_tokenizer


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """KenLM reports loading an LM (a progress bar, a tip) on the process's stderr, below
    Python: silence file descriptor 2 meanwhile. Its errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class BeamSearch:
    """CTC beam search (torchaudio / flashlight-text) over ``tokenizer``'s units: lexicon-free,
    or restricted to the words of ``lexicon`` (each spelled by ``tokenizer.spell``), which
    turns near-miss spellings into words, optionally scored by a word n-gram language model
    (``lm``: an ARPA file, :func:`~recipes.synthetic_speech.language_model.ngram_lm`) weighted by
    ``lm_weight``.

    ``search(log_probs [B, T, V] float32 CPU, lengths [B] int32) -> B transcripts``; a lexicon
    search returns words of the lexicon only (``""`` when it completes none).

    Raises:
        ValueError: ``beam_size`` < 1, ``lm_weight`` < 0, or an ``lm`` without a ``lexicon``
            (a word model scores the words a lexicon completes).
        FileNotFoundError: ``lm`` does not exist.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        beam_size: int,
        lexicon: Optional[Sequence[str]] = None,
        lm: Optional[Path] = None,
        lm_weight: float = 1.0,
    ) -> None:
        from torchaudio.models.decoder import ctc_decoder

        check_int("beam_size", beam_size, low=1)
        check_real("lm_weight", lm_weight, low=0.0)
        if lm is not None and lexicon is None:
            raise ValueError("BeamSearch: a language model (lm) needs a lexicon, got lexicon=None")
        if lm is not None and not Path(lm).is_file():
            raise FileNotFoundError(f"BeamSearch: lm must be an ARPA file, {lm} does not exist")
        self.tokenizer, self.lexicon = tokenizer, lexicon is not None
        options = dict(
            tokens=tokenizer.decoder_tokens(),
            lm=None if lm is None else str(lm),
            lm_weight=lm_weight,
            beam_size=beam_size,
            blank_token="-",
            sil_token="|",
        )
        if lexicon is None:
            self.decoder = ctc_decoder(lexicon=None, **options)
            return
        with tempfile.TemporaryDirectory() as tmp:  # the decoder reads the file while it is built
            path = Path(tmp) / "lexicon.txt"
            path.write_text("".join(f"{word} {' '.join(tokenizer.spell(word))}\n" for word in lexicon))
            with contextlib.nullcontext() if lm is None else _native_stderr_silenced():
                self.decoder = ctc_decoder(lexicon=str(path), unk_word="<unk>", **options)

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> List[str]:
        best = [hits[0] for hits in self.decoder(log_probs, lengths)]
        if self.lexicon:
            return [" ".join(hit.words) for hit in best]
        return [self.tokenizer.decode(hit.tokens).strip() for hit in best]


def split_batches(
    data: Sequence, tokenizer: Tokenizer, max_frames: int = 20000
) -> Iterator[Tuple[List[int], Tensor, Tensor]]:
    """``data`` (``[(features [T, F], text)]``) in length-bucketed batches, in a fixed order:
    ``(indices into data, features [B, T, F], lengths [B])`` on the CPU."""
    for indices in SpeechBatches(data, tokenizer, max_frames=max_frames, shuffle=False).batch_indices():
        features, lengths, _, _ = collate_batch([data[i] for i in indices], tokenizer)
        yield indices, features, lengths


def greedy_transcripts(best: Tensor, lengths: Tensor, tokenizer: Tokenizer) -> List[str]:
    """Greedy CTC transcripts of the frame-wise best labels ``best [B, T']`` (argmax ids) over
    each utterance's ``lengths [B]`` valid frames."""
    return [tokenizer.decode_ctc(best[b, :n]) for b, n in enumerate(lengths.tolist())]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (jiwer) of ``hypotheses`` against ``references`` (outer spaces dropped)."""
    return jiwer.wer(list(references), [h.strip() for h in hypotheses])


@torch.no_grad()
def decode_split(
    model: CTCModel,
    data: Sequence,
    tokenizer: Tokenizer,
    budget: Optional[Budget] = None,
    max_frames: int = 20000,
    beam: Optional[BeamSearch] = None,
) -> Dict:
    """Decode ``data`` (``[(features, text)]``, as :func:`load_split` gives them for the model's
    ``input_features``; ``max_frames`` counts 10 ms frames) under ``budget`` (default full depth).

    Returns WER (greedy, or of ``beam``'s transcripts), executed fraction of
    full-depth token x layers, mean exit depth (methods that decide exits), the fraction of
    frames that skipped the upper layers (methods that skip frames), the fraction of frames
    whose best label is blank and, for methods that choose each sample's layers, how much the
    choice varies over ``data`` (:func:`mask_statistics`); :func:`time_budgets` measures speed.
    The model's training mode is left as it is (:func:`infer` runs in eval mode).
    """
    budget = budget or FullBudget()
    hypotheses, references = [], []
    executed = full = 0
    exit_depths, skipped, frames, skips_frames, blank_frames = [], 0, 0, False, 0
    masks: Counter = Counter()
    device = next(model.parameters()).device
    rows = max_frames * ROWS_PER_FRAME[model.config.input_features]
    for idx, features, lengths in split_batches(data, tokenizer, rows):
        result = infer(model, features.to(device), lengths.to(device), budget)
        executed += result.report.executed_token_layers
        full += result.report.total_tokens * result.report.num_layers
        decisions = result.decisions
        if decisions.exit_depth is not None:
            exit_depths += decisions.exit_depth.tolist()
        if decisions.layer_mask is not None:
            masks.update(mask_string(row) for row in decisions.layer_mask.tolist())
        if decisions.skipped_frames is not None:
            skips_frames = True
            skipped += int(decisions.skipped_frames.sum())
        best = result.log_probs.argmax(-1).cpu()
        result_lengths = result.lengths.cpu()
        frames += int(result_lengths.sum())
        blank_frames += int(((best == 0) & valid_frames(result_lengths, best.shape[1])).sum())
        if beam is None:
            hypotheses += greedy_transcripts(best, result_lengths, tokenizer)
        else:
            hypotheses += beam(result.log_probs.float().cpu().contiguous(), result_lengths.to(torch.int32))
        references += [data[i][1] for i in idx]
    return {
        "wer": word_error_rate(references, hypotheses),
        "executed_fraction": executed / max(full, 1),
        "mean_exit_depth": sum(exit_depths) / len(exit_depths) if exit_depths else None,
        # The regime blank skipping needs: the share of frames whose best label is blank.
        "blank_fraction": blank_frames / max(frames, 1),
        "skipped_frame_fraction": skipped / max(frames, 1) if skips_frames else None,
        **mask_statistics(masks),
    }


def mask_string(layers: Sequence[bool]) -> str:
    """A layer mask as text, layer 1 first: ``"010101"`` ran layers 2, 4 and 6."""
    return "".join("1" if ran else "0" for ran in layers)


def mask_statistics(masks: Counter) -> Dict:
    """How much a method's per-sample layer choice varies, from ``masks`` (a count of each
    :func:`mask_string` over the samples): ``distinct_masks`` (how many masks were used),
    ``top_mask`` (the most common one; of equals, the first in text order, so that the
    samples' order does not matter) and ``top_mask_share`` (the fraction of samples that ran
    it); all None when the method chose no masks. An input-conditioned selector with
    ``distinct_masks`` 1 ran one fixed schedule whatever the input."""
    if not masks:
        return {"distinct_masks": None, "top_mask": None, "top_mask_share": None}
    top, count = min(masks.items(), key=lambda item: (-item[1], item[0]))
    return {"distinct_masks": len(masks), "top_mask": top, "top_mask_share": count / sum(masks.values())}


def time_budgets(
    model: CTCModel,
    data: Sequence,
    tokenizer: Tokenizer,
    budgets: Sequence[Budget],
    repeats: int = 3,
    max_frames: int = 20000,
) -> List[float]:
    """Inference seconds (front-end + encoder + heads; no fbank, no decoding) of ``data`` under
    each of ``budgets``, in their order.

    Each batch counts its fastest of ``repeats`` runs (the minimum is the most repeatable
    statistic on a shared machine), and the runs interleave: every repeat runs each batch under
    every budget in turn, so a slow spell of the machine falls on all budgets rather than on
    whichever was being timed. One untimed run of the first batch per budget warms up first.
    Batch ``j`` always runs with ``torch.manual_seed(j)``, so a random-subset budget draws the
    same masks in every repeat; torch's global RNG state is restored afterwards.
    """
    check_int("repeats", repeats, low=1)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batches = [
            (features.to(device), lengths.to(device))
            for _, features, lengths in split_batches(
                data, tokenizer, max_frames * ROWS_PER_FRAME[model.config.input_features]
            )
        ]
        fastest = [[float("inf")] * len(batches) for _ in budgets]
        for budget in budgets:
            infer(model, *batches[0], budget)
        for _ in range(repeats):
            for j, (features, lengths) in enumerate(batches):
                for per_batch, budget in zip(fastest, budgets):
                    torch.manual_seed(j)
                    tic = time.perf_counter()
                    infer(model, features, lengths, budget)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    per_batch[j] = min(per_batch[j], time.perf_counter() - tic)
    return [sum(per_batch) for per_batch in fastest]


def speedups(rows: Sequence[Dict], seconds_key: str, executed_key: str) -> List[float]:
    """Each row's speed-up over the method's full-depth row (the first whose executed fraction
    is ~1, else the first row): ``full time / row time``."""
    full = next((row for row in rows if row[executed_key] >= 0.999), rows[0])[seconds_key]
    return [full / max(row[seconds_key], 1e-9) for row in rows]


def sweep(
    runs: Path,
    data_dir: Path,
    method_names: Sequence[str],
    beam_size: int = 0,
    limit: Optional[int] = None,
    progress: bool = True,
    timing_repeats: int = 3,
) -> Dict:
    """Evaluate every ``runs/<method>/model.pt`` (or sharded ``model.dcp/``, from FSDP2
    training) found; returns the results dictionary."""
    tokenizer = load_tokenizer(data_dir)
    splits: Dict[str, list] = {}  # "fbank" / "waveform" -> the test split, loaded when a model reads it

    def test_split(kind: str) -> list:
        if kind not in splits:
            splits[kind] = load_split(data_dir, "test", tokenizer=tokenizer, features=kind)[:limit]
        return splits[kind]

    test = test_split("fbank")
    beam = BeamSearch(tokenizer, beam_size) if beam_size else None
    results: Dict = {
        "test_utterances": len(test),
        "threads": torch.get_num_threads(),
        "timing": f"inference seconds over the test split (front-end + encoder + heads), each batch's "
        f"fastest of {timing_repeats} runs interleaved over the budgets",
        "methods": {},
    }
    for method in method_names:
        checkpoint = find_checkpoint(runs / method, "model")
        if checkpoint is None:
            print(f"skipping {method}: no checkpoint at {runs / method / 'model.pt'} (or model.dcp)")
            continue
        model, payload = load_checkpoint(checkpoint)
        test = test_split(model.config.input_features)
        rows = []
        budgets = get_method(method).budgets(model)
        for label, budget in tqdm(budgets, desc=f"eval {method}", disable=not progress):
            torch.manual_seed(0)  # the random-subset budgets draw the same masks every run
            row = {"budget": label, **decode_split(model, test, tokenizer, budget)}
            if beam is not None and label in (
                "full",
                f"n={model.config.num_layers}",
                f"exit={model.config.num_layers}",
            ):
                row["wer_beam"] = decode_split(model, test, tokenizer, budget, beam=beam)["wer"]
            rows.append(row)
        seconds = time_budgets(model, test, tokenizer, [budget for _, budget in budgets], timing_repeats)
        for row, row_seconds in zip(rows, seconds):
            row["seconds"] = row_seconds
        for row, speedup in zip(rows, speedups(rows, "seconds", "executed_fraction")):
            row["speedup"] = speedup
        log = runs / method / "log.jsonl"
        train_log = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        results["methods"][method] = {
            "rows": rows,
            "num_layers": model.config.num_layers,
            "best_dev_epoch": payload.get("epoch"),
            "train_seconds": train_log[-1]["train_seconds"] if train_log else None,
            "dev_wer_per_epoch": [r["dev_wer"] for r in train_log],
        }
    return results


def plot(results: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, entry in results["methods"].items():
        rows = [r for r in entry["rows"] if "random" not in r["budget"]]
        rows.sort(key=lambda r: r["executed_fraction"])
        ax.plot([r["executed_fraction"] for r in rows], [100 * r["wer"] for r in rows], "o-", label=method)
    ax.set_xlabel("executed compute (fraction of full-depth token x layers)")
    ax.set_ylabel("test WER (%)")
    ax.set_title("WER vs executed compute (held-out voices)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: Dict) -> str:
    lines = [
        "| method | budget | WER % | executed | time s | speed-up | exit | skipped | blank frames | masks (top) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in results["methods"].items():
        for r in entry["rows"]:
            exit_depth = "" if r["mean_exit_depth"] is None else f"{r['mean_exit_depth']:.2f}"
            skipped = "" if r["skipped_frame_fraction"] is None else f"{100 * r['skipped_frame_fraction']:.0f} %"
            masks = "" if r["distinct_masks"] is None else f"{r['distinct_masks']} ({100 * r['top_mask_share']:.0f} %)"
            wer = f"{100 * r['wer']:.1f}" + (f" (beam {100 * r['wer_beam']:.1f})" if "wer_beam" in r else "")
            lines.append(
                f"| {method} | {r['budget']} | {wer} | {r['executed_fraction']:.2f} | {r['seconds']:.2f} | "
                f"{r['speedup']:.2f}x | {exit_depth} | {skipped} | {100 * r['blank_fraction']:.0f} % | "
                f"{masks} |"
            )
    return "\n".join(lines) + "\n\n" + equal_compute_table(results)


def equal_compute_table(results: Dict, tolerance: float = 0.02) -> str:
    """WER of every method at the same executed fractions k / L (layer dropping n = k, the
    selector's top-k, an early exit after layer k, ...): the comparison the seed papers make
    (paper 001: the selector against early exit at equal compute). A method's cell is its row
    whose executed fraction lies within ``tolerance`` of k / L (blank when it has none)."""
    methods = list(results["methods"])
    num_layers = max((e.get("num_layers", 0) for e in results["methods"].values()), default=0)
    if not methods or not num_layers:
        return ""
    lines = ["| executed | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in range(num_layers, 0, -1):
        cells = []
        for method in methods:
            near = [
                r
                for r in results["methods"][method]["rows"]
                if abs(r["executed_fraction"] - k / num_layers) <= tolerance
            ]
            cells.append(f"{100 * min(r['wer'] for r in near):.1f}" if near else "")
        lines.append(f"| {k}/{num_layers} | " + " | ".join(cells) + " |")
    return "WER % at equal executed compute:\n\n" + "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="data directory whose test.jsonl is decoded (dynenc.asr.manifest)"
    )
    parser.add_argument("--runs", default="runs", help="directory holding runs/<method>/model.pt")
    parser.add_argument(
        "--methods",
        default=",".join(method_names()),
        help=f"comma-separated methods to evaluate, each from {', '.join(method_names())} (default all)",
    )
    parser.add_argument("--out", default="out/eval", help="where results.json, results.md and the PNG go")
    parser.add_argument("--beam", type=int, default=10, help="beam size for the full-depth rows (0 = greedy only)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test utterances")
    parser.add_argument(
        "--timing-repeats",
        type=int,
        default=3,
        help="time each batch this many times under every budget in turn, keep the fastest",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    check_int("--beam", args.beam, low=0)
    check_int("--timing-repeats", args.timing_repeats, low=1)
    if args.limit is not None:
        check_int("--limit", args.limit, low=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(names) - set(method_names())
    if unknown:
        raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {method_names()}")
    if not any(find_checkpoint(Path(args.runs) / name, "model") for name in names):
        raise ValueError(
            f"nothing to evaluate: no finished run of {', '.join(names)} in --runs {args.runs} "
            "(looked for <runs>/<method>/model.pt or model.dcp; train one with `dynenc train`)"
        )
    results = sweep(Path(args.runs), Path(args.data), names, args.beam, args.limit, not args.quiet, args.timing_repeats)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "wer_vs_compute.png")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'wer_vs_compute.png'}")
    return 0
