"""Train the same tiny model under every dropping method with 2 ranks (DDP or FSDP2, gloo,
CPU) and in a single process on the ranks' batches with the same masks.

Masks differ between the ranks and leave a layer without rows on one rank (per-rank drop
probabilities); each rank's (and each reference shard's) random draws come from
``torch.manual_seed(SEED_STRIDE * step + rank)``. BatchNorm normalises with batch
statistics per rank (no SyncBatchNorm), so the reference runs each rank's batch as its own
forward and averages the losses: what DDP and FSDP2 compute (the mean over the global batch,
the ranks' batches being of equal size). BatchNorm momentum is 0 so the eval-mode teacher
reads the same running statistics everywhere.
"""
import os
import warnings
from typing import Dict, List

import torch
import torch.distributed as dist

from dynenc import methods
from dynenc.asr import CTCModel, ModelConfig, ctc_loss
from dynenc.asr.train import ObjectiveModule, TrainConfig, distribute, shard_model
from toy_ctc import tiny_model, toy_batch

WORLD = 2
STEPS = 2
BATCH = 3
SEED_STRIDE = 1000
# Layer 1 runs on no row of rank 0 and on every row of rank 1, layer 2 the other way round; the
# others drop at random.
DROP_PROBS = ([0.5, 1.0, 0.0, 0.5], [0.5, 0.0, 1.0, 0.5])
CASES = ("layer_drop", "layer_drop_checkpointed", "dld_self", "dld_teacher", "dld_sharded_teacher", "selector",
         "early_exit", "blank_skip", "blank_skip_skipping", "inplace_on_encoder_output",
         # A WavLM-family model on waveforms: its relative position bias table (layer 0) is read by
         # every layer, so FSDP2 keeps layer 0 in the root unit.
         "wavlm_layer_drop", "wavlm_dld_self")


def wavlm_model(seed=0, **fields):
    """A 4-layer D=32 WavLM-family CTC model (torchaudio's base layout at that size), seeded."""
    torch.manual_seed(seed)
    return CTCModel(ModelConfig(encoder="wavlm", vocab_size=6, dim=32, num_heads=4, ffn_dim=64, num_layers=4,
                                dropout=0.0, **fields))


def wave_batch(seed):
    """Three waveforms ``[3, S, 1]`` of different lengths and their CTC targets."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4800, 4000, 3200])
    waves = 0.1 * torch.randn(3, 4800, 1, generator=generator)
    targets = torch.randint(1, 6, (6,), generator=generator)
    return waves, lengths, targets, torch.tensor([3, 2, 1])


class InPlaceOnEncoderOutput:
    """A caller that modifies the encoder's output in place (``out.mul_``) before its CTC head;
    under FSDP2 the encoder is wrapped on its own too, so FSDP2 hooks exactly that output."""

    def __call__(self, model, batch):
        features, lengths, targets, target_lengths = batch
        x, x_lengths = model.embed(features, lengths)
        out, _ = model.encoder(x, x_lengths)
        out.mul_(2.0)
        log_probs = torch.log_softmax(model.ctc_head(out), dim=-1)
        return ctc_loss(log_probs, x_lengths, targets, target_lengths), {}


def build(case: str):
    """``(model, objective factory rank -> Objective, teacher or None)`` of a case, seeded."""
    method = {"dld_self": "dld", "dld_teacher": "dld", "dld_sharded_teacher": "dld",
              "layer_drop_checkpointed": "layer_drop", "blank_skip_skipping": "blank_skip",
              "inplace_on_encoder_output": "static", "wavlm_layer_drop": "layer_drop", "wavlm_dld_self": "dld"}.get(
                  case, case)
    make = wavlm_model if case.startswith("wavlm_") else tiny_model
    fields = methods.get_method(method).model_fields(make().config)
    model = make(seed=0, **fields).train()
    model.encoder.checkpoint_layers = case == "layer_drop_checkpointed"
    teacher = tiny_model(seed=1).eval() if case in ("dld_teacher", "dld_sharded_teacher") else None
    for module in [model] + ([teacher] if teacher is not None else []):
        for norm in module.modules():
            if isinstance(norm, torch.nn.BatchNorm1d):
                norm.momentum = 0.0

    def objective(rank: int):
        probs = torch.tensor(DROP_PROBS[rank])
        if method == "layer_drop":
            return methods.LayerDropCTC(4, drop_prob=probs)
        if method == "dld":
            return methods.DLDObjective(teacher if teacher is not None else "self", drop_prob=probs,
                                        hidden_weight=0.1)
        if method == "selector":
            return methods.SelectorObjective(min_layers=1)
        if case == "blank_skip_skipping":  # upper layers on compacted sequences: ragged per rank
            return methods.BlankSkipObjective(skip_threshold=0.5, spike_window=0)
        if case == "inplace_on_encoder_output":
            return InPlaceOnEncoderOutput()
        return methods.get_method(method).objective(TrainConfig(method=method), model)

    return model, objective, teacher


def shard(step: int, rank: int, case: str = ""):
    """Rank ``rank``'s batch at ``step`` (waveforms for the WavLM cases)."""
    if case.startswith("wavlm_"):
        return wave_batch(100 * step + rank)
    return toy_batch(100 * step + rank, batch_size=BATCH)


def row_counter(model) -> List[int]:
    """A list that the encoder layers' forward pre-hooks extend with the rows they run on
    (in layer order, one entry per call)."""
    rows: List[int] = []
    for layer in model.encoder.routed_layers():
        layer.register_forward_pre_hook(lambda _module, args: rows.append(args[0].shape[0]))
    return rows


def full_parameters(model) -> Dict[str, torch.Tensor]:
    """Every parameter as a full local tensor (FSDP2's DTensor shards gathered)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def train_reference(case: str) -> Dict[str, torch.Tensor]:
    """One process: each step averages the ranks' losses on their batches."""
    model, objective, _ = build(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    objectives = [objective(rank) for rank in range(WORLD)]
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = 0.0
        for rank in range(WORLD):
            torch.manual_seed(SEED_STRIDE * step + rank)
            loss = loss + objectives[rank](model, shard(step, rank, case))[0] / WORLD
        loss.backward()
        optimizer.step()
    return full_parameters(model)


def train_rank(case: str, strategy: str, rank: int) -> Dict[str, object]:
    model, objective, teacher = build(case)
    rows = row_counter(model)
    module = ObjectiveModule(model, objective(rank))
    if case == "dld_sharded_teacher" and strategy == "ddp":
        return {}  # a sharded teacher needs FSDP2 (the DDP run has an unsharded one)
    if case == "dld_teacher" and strategy == "fsdp2":
        module.objective.teacher = teacher  # distribute() shards a teacher: keep this one whole
        wrapped = module
        shard_model(module, model)
    elif case == "inplace_on_encoder_output" and strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.conformer_layers:
            fully_shard(layer)
        fully_shard(model.encoder)  # the module whose output the objective modifies in place
        fully_shard(module)
        wrapped = module
    else:
        wrapped = distribute(module, strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            torch.manual_seed(SEED_STRIDE * step + rank)
            loss, _ = wrapped(shard(step, rank, case))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    view_warnings = sum("returned a view tensor" in str(w.message) for w in caught)
    return {"params": full_parameters(model), "rows": rows, "view_warnings": view_warnings}


def worker(rank: int, strategy: str, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {case: train_rank(case, strategy, rank) for case in CASES}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
