"""CTC log-probs that spell a unit sequence, for the beam-search tests."""
import torch


def spelled(tok, ids, trailing_blank=True):
    """Log-probs ``[1, T, V]`` that spell ``ids``, a blank frame after each unit (after the last
    one only with ``trailing_blank``, so the last unit may sit on the final frame)."""
    frames = 2 * len(ids) - (0 if trailing_blank else 1)
    log_probs = torch.full((1, frames, tok.vocab_size), -20.0)
    for t, i in enumerate(ids):
        log_probs[0, 2 * t, i] = 0.0
        if 2 * t + 1 < frames:
            log_probs[0, 2 * t + 1, 0] = 0.0
    return log_probs, torch.tensor([frames], dtype=torch.int32)
