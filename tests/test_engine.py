"""The training core: learning, exact resume, determinism, DDP equivalence."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bsf.engine import Engine


def _weights_equal(a: Engine, b: Engine) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_loss_falls_on_synthetic_brains(stage1_config):
    engine = Engine(stage1_config("train.steps=30", "optim.lr=1e-3", "optim.warmup_steps=3"))
    losses = [r["loss"] for r in engine.train_steps(30)]
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert engine.validate()["val_reconstruction_l1"] < 1.0


def test_same_seed_same_run_other_seed_other_run(stage1_config):
    a = Engine(stage1_config("train.steps=2")).train_steps(2)
    b = Engine(stage1_config("train.steps=2")).train_steps(2)
    c = Engine(stage1_config("train.steps=2", "seed=1")).train_steps(2)
    assert a == b
    assert a != c


def test_resume_gives_bit_identical_following_steps(stage1_config, tmp_path):
    config = stage1_config("train.steps=4", "optim.warmup_steps=1")
    straight = Engine(config)
    straight_records = straight.train_steps(4)

    first = Engine(config)
    first.train_steps(2)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = Engine(config)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 2
    resumed_records = resumed.train_steps(2)

    assert resumed_records == straight_records[2:]
    assert _weights_equal(resumed, straight)


def test_get_and_set_weights_round_trip(stage1_config):
    source, target = Engine(stage1_config()), Engine(stage1_config("seed=3"))
    assert not _weights_equal(source, target)
    encoder = source.get_weights("encoder")
    assert encoder and all(k.startswith("swinViT.") for k in encoder)
    target.set_weights(source.get_weights("all"))
    assert _weights_equal(source, target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, overrides: list[str], queue) -> None:
    from bsf.config import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        engine = Engine(load_config("stage1_test", overrides), rank=rank, world_size=world_size)
        records = engine.train_steps(2)
        if rank == 0:
            queue.put((records, engine.get_weights("all")))
    finally:
        dist.destroy_process_group()


def _get_result(queue, procs, timeout_s: float = 600.0):
    """The result rank 0 puts in ``queue``; fail at once when a worker dies instead of waiting."""
    import queue as queue_module
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=2)
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                pytest.fail(f"a DDP worker exited with {dead}")
    pytest.fail("DDP workers timed out")


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_with_same_global_batch(stage1_config, ukb_root, tmp_path):
    """2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches (same samples, same views).

    Both sides run one intra-op thread: a different thread count alone reorders float32 sums, and
    Adam's first steps (update ~ lr * sign(gradient)) turn that noise into differences of up to
    2 * lr on the ~2 % of weights whose gradients are at noise level. With equal threads the only
    difference left is all-reduce vs accumulation order: tolerance 1e-5 on losses and weights.
    """
    overrides = [f"data.root={ukb_root}", f"train.output_dir={tmp_path}", "train.steps=2", "optim.warmup_steps=0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker: the thread count changes float32 summation order
    try:
        single = Engine(stage1_config("train.steps=2", "optim.warmup_steps=0", "optim.accumulate=2"))
        single_records = single.train_steps(2)
    finally:
        torch.set_num_threads(threads)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, overrides, queue)) for r in range(2)]
    for p in procs:
        p.start()
    ddp_records, ddp_weights = _get_result(queue, procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    for s, d in zip(single_records, ddp_records):
        for key in ("loss", "rotation", "contrastive", "reconstruction"):
            assert s[key] == pytest.approx(d[key], abs=1e-5), key
    single_weights = single.get_weights("all")
    worst = max(float(np.abs(single_weights[k] - ddp_weights[k]).max()) for k in single_weights)
    assert worst <= 1e-5, f"weights differ by up to {worst:.2e}"


def test_mixed_precision_on_the_cpu_is_refused_with_the_fix(stage1_config):
    from bsf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.precision=bf16 on the CPU.*set train.precision=fp32"):
        Engine(stage1_config("train.precision=bf16", "train.device=cpu"))
