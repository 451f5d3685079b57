"""A tiny hand-written corpus for tests that need a data directory but no speech engine: sine
tones (utterance i lasts 0.3 + 0.1 i s) in the manifest layout of dynenc.asr.manifest."""
import json

import numpy as np
import soundfile as sf

from dynenc.asr.features import SAMPLE_RATE


def tone(index: int, seconds: float) -> np.ndarray:
    """A sine of ``200 + 60 * index`` Hz with light noise: float samples ``[SAMPLE_RATE * seconds]``."""
    n = int(SAMPLE_RATE * seconds)
    t = np.arange(n) / SAMPLE_RATE
    noise = np.random.default_rng(index).standard_normal(n)
    return 0.3 * np.sin(2 * np.pi * (200 + 60 * index) * t) + 0.01 * noise


def write_tone_corpus(root, texts):
    """Manifests + 16 kHz PCM_16 WAVs in the layout synthesize_corpus writes, one split per
    key of ``texts`` (``{split: [transcript, ...]}``); returns ``root``."""
    for split, split_texts in texts.items():
        (root / "wav" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, text in enumerate(split_texts):
            uid = f"{split}_{i:05d}"
            rel = f"wav/{split}/{uid}.wav"
            audio = tone(i, 0.3 + 0.1 * i)
            sf.write(str(root / rel), audio, SAMPLE_RATE, subtype="PCM_16")
            lines.append(json.dumps({"id": uid, "path": rel, "text": text, "duration": len(audio) / SAMPLE_RATE}))
        (root / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


WORDS = ("go", "left", "right", "stop", "turn", "red", "door", "open", "zero", "one", "two", "three")


def write_tone_splits(root, num_train, num_dev, num_test):
    """:func:`write_tone_corpus` with ``num_*`` utterances per split, each transcript two or three
    of :data:`WORDS` chosen by its index (deterministic)."""
    def texts(count, offset):
        return [" ".join(WORDS[(offset + i * k) % len(WORDS)] for k in range(1, 3 + i % 2)) for i in range(count)]
    return write_tone_corpus(root, {"train": texts(num_train, 0), "dev": texts(num_dev, 5), "test": texts(num_test, 7)})
