"""Two-process DDP (gloo, CPU) with per-sample layer dropping and no find_unused_parameters."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toy_ctc import tiny_model, toy_batch


def _train(rank, world_size, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    from dynenc import methods  # noqa: F401  (imported after fork/spawn)
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model(seed=0).train()
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False (the default)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    objective = methods.LayerDropCTC(4, drop_prob=0.5)
    torch.manual_seed(rank)  # ranks draw different masks
    for step in range(3):
        batch = toy_batch(10 * rank + step, batch_size=4)
        if step == 0:
            # Rank 0 runs no sample through layer 1: its parameters must still reduce.
            features, lengths, targets, target_lengths = batch
            mask = torch.ones(4, 4, dtype=torch.bool)
            mask[:, 1] = rank != 0
            log_probs, out_lengths, _ = ddp(features, lengths, layer_mask=mask)
            loss = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths)
        else:
            loss, _ = objective(ddp, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_layer_drop_keeps_ranks_identical(tmp_path):
    mp.spawn(_train, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.isfinite(rank0).all()
    assert torch.equal(rank0, rank1)
    initial = torch.cat([p.detach().flatten() for p in tiny_model(seed=0).parameters()])
    assert not torch.equal(rank0, initial), "training must have moved the parameters"
