"""DARTS augment: train the network of a genotype from scratch, report its test accuracy.

    python augment.py --name cifar10 --dataset cifar10 --genotype DARTS_V2
    python augment.py --name mine --dataset mnist --genotype searchs/mnist/genotype.txt
    python augment.py --name s --dataset cifar10 --genotype "Genotype(normal=[...], ...)"

Trains on the full training set and evaluates on the test set after every epoch (DARTS.md,
section 3: there is no validation split here, and the log says "test"). Writes
augments/<name>/: augment.log, config.json, tb/ (tensorboard), checkpoint.pth.tar (every
epoch) and best.pth.tar (whenever the test top-1 improves).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

import genotypes as gt
import utils
from config import AugmentConfig
from models.augment_cnn import AugmentCNN
from preproc import dataset_info, get_dataset

RUN_ROOT = "augments"


def train_step(
    model: AugmentCNN | DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    aux_weight: float,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch (DARTS.md, section 2).

    loss = CE(logits, y) + aux_weight * CE(aux_logits, y) (the second term only when the model
    returns auxiliary logits, i.e. it has the head and is in training mode); gradient-norm
    clipping at ``grad_clip``. Returns the (detached) total loss and the main logits.
    """
    optimizer.zero_grad(set_to_none=True)
    logits, aux_logits = model(X)
    loss = F.cross_entropy(logits, y)
    if aux_logits is not None and aux_weight > 0:
        loss = loss + aux_weight * F.cross_entropy(aux_logits, y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), logits.detach()


def drop_path_schedule(final_p: float, epoch: int, epochs: int) -> float:
    """Drop-path probability of (1-based) ``epoch``: ``final_p * (epoch - 1) / epochs``.

    Grows linearly from 0 in the first epoch (DARTS.md, section 2) and reaches
    ``final_p * (epochs - 1) / epochs`` in the last; the authors' code does the same with
    0-based epochs (``p * epoch / epochs``).
    """
    return final_p * (epoch - 1) / epochs


def make_loaders(
    cfg: AugmentConfig, pin: bool, dist_info: utils.DistInfo | None = None
) -> tuple[DataLoader, DataLoader, torch.Generator]:
    """Full training set (augmentation + Cutout), shuffled by a generator seeded with the seed;
    the test set in order. Under DDP each process trains on the shard of a DistributedSampler
    (its epoch set every epoch) and tests on every world_size-th test image, so that the shards
    together hold each test image once."""
    dist_info = dist_info or utils.DistInfo()
    train_data = get_dataset(
        cfg.dataset, cfg.data_path, train=True, augment=True, cutout_length=cfg.cutout_length
    )
    test_data = get_dataset(cfg.dataset, cfg.data_path, train=False)
    # Training workers are not persistent: each epoch re-seeds them from `gen`, so a resumed run
    # draws the same augmentations as an uninterrupted one.
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler: DistributedSampler | None = None
    n_train = len(train_data)  # type: ignore[arg-type]
    if dist_info.enabled:
        sampler = DistributedSampler(
            train_data, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed
        )
        n_train = len(sampler)
        test_data = Subset(
            test_data,
            range(dist_info.rank, len(test_data), dist_info.world_size),  # type: ignore[arg-type]
        )
    # A last training batch of one sample would make the auxiliary head's BN (1x1 maps) fail.
    drop_last = n_train % cfg.batch_size == 1
    train_loader = DataLoader(
        train_data,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        num_workers=cfg.workers,
        pin_memory=pin,
        drop_last=drop_last,
    )
    test_loader = DataLoader(
        test_data,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=pin,
        persistent_workers=cfg.workers > 0,
    )
    return train_loader, test_loader, gen


def train_epoch(
    cfg: AugmentConfig,
    model: AugmentCNN | DistributedDataParallel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    device: torch.device,
    logger,
    writer,
    global_step: int,
    last_good: str | None,
) -> tuple[dict, int]:
    model.train()
    meters = utils.Meters()
    net = model.module if isinstance(model, DistributedDataParallel) else model
    aux_weight = cfg.aux_weight if net.aux_head is not None else 0.0
    n_steps = len(loader)
    steps = utils.progress(loader, n_steps, f"Epoch {epoch}", not cfg.no_progress)
    for step, (X, y) in enumerate(steps):
        X = X.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        loss, logits = train_step(model, optimizer, X, y, aux_weight, cfg.grad_clip)
        if not torch.isfinite(loss):
            raise utils.NonFiniteLossError(
                f"non-finite training loss at epoch {epoch} step {step}; last good checkpoint: "
                f"{last_good or 'none yet'}"
            )
        meters.update(loss, logits, y)
        global_step += 1
        writer.add_scalar("train/loss", loss.item(), global_step)
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{meters.loss.avg:.3f}", top1=f"{meters.top1.avg:.1%}")
        if step % cfg.print_freq == 0 or step == n_steps - 1:
            logger.info(
                f"Train: [{epoch:3d}/{cfg.epochs}] step {step:03d}/{n_steps - 1:03d} {meters}"
            )
    return meters.summary(), global_step


def run(cfg: AugmentConfig, genotype: gt.Genotype) -> tuple[float, float]:
    """Train and evaluate; returns (final, best) test top-1 in [0, 1]."""
    dist_info, device = utils.init_distributed(cfg)
    is_main = dist_info.is_main  # only the first process writes logs, plots and checkpoints
    info = dataset_info(cfg.dataset)
    # Data and settings are checked before the run folder is made: bad input writes nothing.
    run_dir = os.path.join(RUN_ROOT, cfg.name)
    resumed = utils.open_run(run_dir, cfg)
    train_loader, test_loader, data_gen = make_loaders(
        cfg, pin=device.type == "cuda", dist_info=dist_info
    )
    utils.make_run_dir(run_dir)
    logger = utils.get_logger(os.path.join(run_dir, "augment.log"), "darts.augment", is_main)
    logger.info(f"Augment on {device} (PyTorch {torch.__version__}) with config:\n{cfg}")
    logger.info(f"Genotype = {gt.to_str(genotype)}")
    if is_main:
        cfg.save(os.path.join(run_dir, "config.json"))
    # The same seed in every process: the same initial weights, and RNG streams that the
    # checkpoint of the first process restores for all of them.
    utils.set_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if cfg.cutout_length >= info.input_size:
        logger.warning(
            f"WARNING: --cutout_length {cfg.cutout_length} is not smaller than the "
            f"{info.input_size}x{info.input_size} images of {cfg.dataset}: Cutout can "
            f"blank whole training images (try --cutout_length "
            f"{info.input_size // 2} or 0)"
        )
    model = AugmentCNN(
        info.input_size,
        info.input_channels,
        cfg.init_channels,
        info.n_classes,
        cfg.layers,
        cfg.aux_weight > 0,
        genotype,
    ).to(device)
    model.to(memory_format=utils.memory_format(cfg))
    n_params = utils.count_parameters(model, exclude="aux_head")
    aux_note = (
        f"auxiliary head {utils.count_parameters(model) - n_params:,} more, on "
        f"{model.aux_head.spatial}x{model.aux_head.spatial} maps"
        if model.aux_head is not None
        else "no auxiliary head (--aux_weight 0)"
    )
    logger.info(
        f"Model: {n_params:,} parameters = {n_params / 1e6:.2f}M without the auxiliary "
        f"head; {aux_note}"
    )
    optimizer = torch.optim.SGD(
        model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, eta_min=0.0)
    criterion = nn.CrossEntropyLoss()
    train_model = utils.wrap_ddp(model, dist_info, device)  # averages the gradients

    from tensorboardX import SummaryWriter  # a heavy import, only needed when a run starts

    import visualize

    ckpt_path = os.path.join(run_dir, utils.CHECKPOINT)
    best_path = os.path.join(run_dir, "best.pth.tar")
    history: list[dict[str, Any]] = []
    best_top1, best_epoch, global_step, start = -1.0, 0, 0, 1
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        utils.set_rng_state(resumed["rng"], data_gen)
        history, best_top1, best_epoch = (
            resumed["history"],
            resumed["best_top1"],
            resumed["best_epoch"],
        )
        global_step, start = resumed["global_step"], resumed["epoch"] + 1
        logger.info(f"Resumed from {ckpt_path} after epoch {resumed['epoch']}")
    # purge_step drops what an interrupted run logged after its last checkpoint.
    writer = (
        utils.NullWriter()
        if not is_main
        else SummaryWriter(
            log_dir=os.path.join(run_dir, "tb"), purge_step=global_step + 1 if resumed else None
        )
    )
    try:
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.time()
            lr = float(scheduler.get_last_lr()[0])
            drop_p = drop_path_schedule(cfg.drop_path_prob, epoch, cfg.epochs)
            model.drop_path_prob(drop_p)
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            logger.info(f"Epoch {epoch}: lr {lr:.6f} drop_path_prob {drop_p:.4f}")
            train, global_step = train_epoch(
                cfg,
                train_model,
                train_loader,
                optimizer,
                epoch,
                device,
                logger,
                writer,
                global_step,
                utils.last_checkpoint(run_dir),
            )
            scheduler.step()
            utils.broadcast_buffers(model)  # every shard is scored by the checkpoint's network
            test = utils.evaluate(model, test_loader, device, criterion)
            is_best = test["top1"] > best_top1
            if is_best:
                best_top1, best_epoch = test["top1"], epoch
            logger.info(
                f"Test: [{epoch:3d}/{cfg.epochs}] loss {test['loss']:.3f} "
                f"top1 {test['top1']:.2%} top5 {test['top5']:.2%} "
                f"(best top1 {best_top1:.2%} at epoch {best_epoch})"
            )
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": lr,
                "drop_path_prob": drop_p,
                **{f"train_{k}": v for k, v in train.items()},
                **{f"test_{k}": v for k, v in test.items()},
                "time": time.time() - t0,
            }
            for k, v in record.items():
                if k != "epoch":
                    writer.add_scalar(k.replace("_", "/", 1), v, epoch)
            history.append(record)

            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "history": history,
                "genotype": gt.to_str(genotype),
                "config": cfg.to_dict(),
                "rng": utils.rng_state(data_gen),
            }
            if not is_main:
                continue
            utils.save_checkpoint(state, ckpt_path)
            if is_best:
                utils.save_checkpoint(state, best_path)
            # Rebuilt whole from the checkpointed history: a resumed run has each epoch once.
            visualize.write_jsonl(os.path.join(run_dir, "metrics.jsonl"), history)
            visualize.plot_curves(history, os.path.join(run_dir, "curves.png"), "test")
            logger.info(f"Epoch {epoch} done in {time.time() - t0:.1f}s")
    finally:
        writer.close()

    if dist_info.enabled:
        same = utils.replicas_identical(model)
        logger.info(
            f"DDP: weights and BN statistics are {'identical' if same else 'DIFFERENT'} on the "
            f"{dist_info.world_size} processes"
        )
    final_top1 = history[-1]["test_top1"]
    logger.info(
        f"Done: final test top1 {final_top1:.2%}, best {best_top1:.2%} at epoch "
        f"{best_epoch}; checkpoints in {run_dir}"
    )
    if is_main:
        print(f"Final test top1 = {final_top1:.2%}")
        print(f"Best test top1 = {best_top1:.2%}")
    return final_top1, best_top1


def main(argv: list[str] | None = None) -> int:
    def prepare(argv: list[str]) -> tuple[AugmentConfig, Callable[[], Any]]:
        cfg = AugmentConfig.from_argv(argv)
        genotype = gt.load(cfg.genotype)  # parsed, never evaluated; before anything is written
        return cfg, lambda: run(cfg, genotype)

    return utils.script_main(__file__, RUN_ROOT, argv, prepare)


if __name__ == "__main__":
    sys.exit(main())
