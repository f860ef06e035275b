"""DARTS augment: train the network of a genotype from scratch, report its test accuracy.

    python augment.py --name cifar10 --dataset cifar10 --genotype DARTS_V2
    python augment.py --name mine --dataset mnist --genotype searchs/mnist/genotype.txt
    python augment.py --name s --dataset cifar10 --genotype "Genotype(normal=[...], ...)"
    python augment.py --name ft --dataset folder --data_path /data/birds --genotype DARTS_V2 \
        --init_from imagenet_model.pt --epochs 30     # fine-tune the authors' weights

Trains on the full training set and evaluates on the test set after every epoch (DARTS.md,
section 3); the final epoch's test accuracy is the figure the paper reports. With
``--val_portion`` a part of the training set is held out instead, and it alone chooses the
best epoch. Writes augments/<name>/: augment.log, config.json, tb/ (tensorboard),
metrics.jsonl, curves.png, checkpoint.pth.tar (every epoch) and best.pth.tar (the best epoch).

The loop, the run folder and the checkpoints are engine.py's; this file holds the model, the
data, the training step (:func:`train_step`, the function that scripts/benchmark.py times) and
the stage around them (:func:`train`).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset

import engine
import genotypes as gt
import official
from config import AugmentConfig, ConfigError
from distributed import DistInfo, wrap_ddp
from models.augment_cnn import AugmentCNN
from models.flops import RULE, mult_adds
from preproc import dataset_info, get_dataset, resolve_normalize, set_max_image_pixels
from utils import clip_grad_norm, count_parameters

RUN_ROOT = "augments"


def train_step(
    model: AugmentCNN | DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    aux_weight: float,
    grad_clip: float,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch (DARTS.md, section 2).

    loss = CE(logits, y) + aux_weight * CE(aux_logits, y) (the second term only when the model
    returns auxiliary logits, i.e. it has the head and is in training mode), both with
    ``label_smoothing``; gradient-norm clipping at ``grad_clip``. ``amp_dtype``: the forward
    under autocast to bfloat16 or float16; float16 takes a gradient ``scaler``, and the
    gradients are unscaled before they are clipped. Returns the (detached) total loss and the
    main logits.
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(X.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits, aux_logits = model(X)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if aux_logits is not None and aux_weight > 0:
            aux = F.cross_entropy(aux_logits, y, label_smoothing=label_smoothing)
            loss = loss + aux_weight * aux
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_grad_norm(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        clip_grad_norm(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach(), logits.detach()


def lr_factor(cfg: AugmentConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch`` over ``--lr``: a linear warm-up over
    ``--warmup_epochs`` (epoch e at (e + 1) / warmup), then ``--lr_schedule`` over the rest:
    step (``lr_gamma ** e``, the ImageNet recipe's 0.97), linear to 0, or cosine to 0."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    e, n = epoch - cfg.warmup_epochs, cfg.epochs - cfg.warmup_epochs
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma**e
    if cfg.lr_schedule == "linear":
        return 1.0 - e / n
    return 0.5 * (1.0 + math.cos(math.pi * e / n))


def make_optimizer(model: nn.Module, cfg: AugmentConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay (paper, section 3.3). foreach: one call per operation
    over all tensors on the CPU too (torch's default there is a loop of calls per tensor); the
    same arithmetic."""
    return torch.optim.SGD(
        model.parameters(),
        cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: AugmentConfig) -> Any:
    """The schedule of ``--lr_schedule`` and ``--warmup_epochs``, stepped after every epoch. The
    paper's cosine without warm-up is PyTorch's CosineAnnealingLR, as it always was here."""
    if cfg.lr_schedule == "cosine" and cfg.warmup_epochs == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp``; ConfigError where the device cannot run it."""
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (use --amp bf16 on a CPU)")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def drop_path_schedule(final_p: float, epoch: int, epochs: int) -> float:
    """Drop-path probability of (1-based) ``epoch``: ``final_p * (epoch - 1) / epochs``.

    Grows linearly from 0 in the first epoch (DARTS.md, section 2) and reaches
    ``final_p * (epochs - 1) / epochs`` in the last; the authors' code does the same with
    0-based epochs (``p * epoch / epochs``).
    """
    return final_p * (epoch - 1) / epochs


def make_loaders(
    cfg: AugmentConfig,
    pin: bool,
    dist_info: DistInfo | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Any, Any | None, Any | None, torch.Generator]:
    """(train, validation or None, test or None (``--no_test``), generator).

    The training set (augmentation + Cutout), less the ``--val_portion`` held out for
    validation (without augmentation; a split fixed by the seed), shuffled by ``generator``;
    the test set in order. Under DDP each process trains on the shard of a DistributedSampler
    (its epoch set every epoch) and evaluates every world_size-th image, so that the shards
    together hold each image once."""
    dist_info = dist_info or DistInfo()
    world, rank = dist_info.world_size, dist_info.rank
    data = functools.partial(
        get_dataset,
        cfg.dataset,
        cfg.data_path,
        image_size=cfg.image_size,
        normalize=cfg.normalize,
    )
    train_data: Any = data(train=True, augment=True, cutout_length=cfg.cutout_length)
    # --no_test (a selection run): the test set is not even opened.
    test_data: Any = None if cfg.no_test else data(train=False)
    val_data = None
    if cfg.val_portion > 0:
        n = len(train_data)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = int(cfg.val_portion * n)
        if not 0 < n_val < n:
            raise ConfigError(
                f"--val_portion {cfg.val_portion} of the {n} {cfg.dataset} training images "
                f"leaves an empty split"
            )
        plain = data(train=True)
        val_data = Subset(plain, perm[:n_val][rank::world])
        train_data = Subset(train_data, perm[n_val:])
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    sampler: DistributedSampler | None = None
    n_train = len(train_data)
    if dist_info.enabled:
        sampler = DistributedSampler(train_data, world, rank, shuffle=True, seed=cfg.seed)
        n_train = len(sampler)
        if test_data is not None:
            test_data = Subset(test_data, range(rank, len(test_data), world))
    # Training workers are not persistent: each epoch re-seeds them from `gen`, so a resumed run
    # draws the same augmentations as an uninterrupted one.
    train_loader = engine.data_loader(
        train_data,
        cfg.batch_size,
        cfg.workers,
        pin,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        # A last batch of one sample would make the auxiliary head's BN (1x1 maps) fail.
        drop_last=n_train % cfg.batch_size == 1,
    )

    def eval_loader(data: Any) -> Any:
        persistent = cfg.workers > 0
        return engine.data_loader(
            data, cfg.batch_size, cfg.workers, pin, persistent_workers=persistent
        )

    val_loader = eval_loader(val_data) if val_data is not None else None
    test_loader = eval_loader(test_data) if test_data is not None else None
    return train_loader, val_loader, test_loader, gen


def build_model(cfg: AugmentConfig, genotype: gt.Genotype) -> AugmentCNN:
    """The network of ``genotype`` at the config's size, for the config's data set."""
    info = dataset_info(cfg.dataset, cfg.data_path, cfg.image_size)
    return AugmentCNN(
        info.input_size,
        info.input_channels,
        cfg.init_channels,
        info.n_classes,
        cfg.layers,
        cfg.aux_weight > 0,
        genotype,
        imagenet=cfg.imagenet_stem,
    )


def describe(model: AugmentCNN) -> str:
    """The parameter count as the paper reports it (without the auxiliary head), and the
    mult-adds at the input size, with the rule that counts them (models/flops.py)."""
    n = count_parameters(model, exclude="aux_head")
    aux = (
        f"auxiliary head {count_parameters(model) - n:,} more, on "
        f"{model.aux_head.spatial}x{model.aux_head.spatial} maps"
        if model.aux_head is not None
        else "no auxiliary head (--aux_weight 0)"
    )
    size = model.input_size
    madds = mult_adds(model, (model.C_in, size, size))
    return (
        f"Model: {n:,} parameters = {n / 1e6:.2f}M without the auxiliary head; {aux}\n"
        f"Model: {madds:,} mult-adds = {madds / 1e6:.1f}M at {size}x{size} ({RULE})"
    )


def init_weights(cfg: AugmentConfig, genotype: gt.Genotype) -> official.Matched | None:
    """``--init_from``: the file's tensors matched onto the network of ``cfg`` (official.py:
    the authors' formats or this project's checkpoints; every tensor but the classifiers of
    another class count), checked before anything is written and loaded by :func:`train`.
    None without --init_from, and on --resume (the run's checkpoint holds its weights)."""
    if not cfg.init_from or cfg.resume:
        return None
    model = build_model(cfg, genotype)
    name = official.network_name(
        cfg.genotype, cfg.imagenet_stem, cfg.init_channels, cfg.layers, model.linear.out_features
    )
    matched = official.init_state(model, cfg.init_from, name)
    official.warn_if_not_finite(cfg.init_from, matched.weights.tensors)
    return matched


def train(
    cfg: AugmentConfig, genotype: gt.Genotype, init: official.Matched | None = None
) -> tuple[float, float]:
    """The augment stage: train with :func:`train_step`, evaluate after every epoch; returns
    the final epoch's top-1 and the best epoch's (selected on the validation split when there
    is one, else on the test set), in [0, 1], on the test set (on the validation split with
    ``--no_test``). ``init``: the weights to start from (:func:`init_weights`)."""
    input_size = dataset_info(cfg.dataset, cfg.data_path, cfg.image_size).input_size
    with engine.Run.open(cfg, RUN_ROOT, "augment") as run:
        dtype = amp_dtype(cfg.amp, run.device)  # refused on this device before anything is written
        train_loader, val_loader, test_loader, _ = make_loaders(
            cfg, run.pin_memory, run.dist, run.data_gen
        )
        run.start("Augment")
        run.logger.info(f"Genotype = {gt.to_str(genotype)}")
        if cfg.cutout_length >= input_size:
            run.logger.warning(cutout_warning(cfg, input_size))
        model = build_model(cfg, genotype)
        if init is not None and run.resumed is None:
            official.apply(model, init)
            run.logger.info(init.summary())
        model = run.place(model)
        for line in describe(model).splitlines():
            run.logger.info(line)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        train_model = wrap_ddp(model, run.dist, run.device)  # averages the gradients
        aux_weight = cfg.aux_weight if model.aux_head is not None else 0.0
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        # The checkpoint: these state_dicts and values (restored here on --resume), and what Run
        # adds to every checkpoint (engine.RUN_KEYS): epoch, global_step, history (every
        # epoch's record), config, code_version (the commit), rng (the Python, NumPy, torch and
        # CUDA states, and the batch order's).
        run.track(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,  # --amp fp16 only: left out of the checkpoint when None
            extra={"best_top1": -1.0, "best_epoch": 0, "genotype": gt.to_str(genotype)},
        )
        select = "val" if val_loader is not None else "test"  # the split that picks the best
        report = "test" if test_loader is not None else "val"  # the split of the final figure

        def step(
            batch: tuple[torch.Tensor, torch.Tensor],
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            X, y = batch
            loss, logits = train_step(
                train_model, optimizer, X, y, aux_weight, cfg.grad_clip,
                cfg.label_smoothing, dtype, scaler,
            )  # fmt: skip
            return loss, logits, y

        def write_files() -> None:
            import visualize

            visualize.plot_curves(run.history, run.path("curves.png"), report)

        for epoch in run.epochs():
            lr = float(scheduler.get_last_lr()[0])
            drop_p = drop_path_schedule(cfg.drop_path_prob, epoch, cfg.epochs)
            model.drop_path_prob(drop_p)
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            run.logger.info(f"Epoch {epoch}: lr {lr:.6f} drop_path_prob {drop_p:.4f}")
            trained = engine.train_one_epoch(run, step, train_loader, epoch)
            scheduler.step()
            record: dict[str, Any] = {"epoch": epoch, "lr": lr, "drop_path_prob": drop_p}
            record.update({f"train_{k}": v for k, v in trained.items()})
            splits = {"val": val_loader, "test": test_loader}
            is_best = evaluate_epoch(run, model, splits, record, select, dtype)
            engine.log_skipped_files(run, train_loader.dataset, val_loader, test_loader)
            run.end_epoch(record, is_best=is_best, write_files=write_files)

        run.check_replicas("weights and BN statistics")
        return report_result(run, select, report)


def cutout_warning(cfg: AugmentConfig, size: int) -> str:
    return (
        f"WARNING: --cutout_length {cfg.cutout_length} is not smaller than the {size}x{size} "
        f"images of {cfg.dataset}: Cutout can blank whole training images (try "
        f"--cutout_length {size // 2} or 0)"
    )


def evaluate_epoch(
    run: engine.Run,
    model: AugmentCNN,
    splits: dict[str, Any],
    record: dict[str, Any],
    select: str,
    dtype: torch.dtype | None,
) -> bool:
    """Evaluate on every split that has a loader, into ``record`` (``val_top1``, ...), and log
    it; keep the best epoch by the ``select`` split. Returns whether this epoch is the best."""
    for split, loader in splits.items():
        if loader is not None:
            result = engine.evaluate(model, loader, run.device, nn.CrossEntropyLoss(), dtype)
            record.update({f"{split}_{k}": v for k, v in result.items()})
    epoch, top1 = record["epoch"], record[f"{select}_top1"]
    is_best = top1 > run.extra["best_top1"]
    if is_best:
        run.extra["best_top1"], run.extra["best_epoch"] = top1, epoch
    best = f" (best {select} top1 {run.extra['best_top1']:.2%} at epoch {run.extra['best_epoch']})"
    for split, name in (("val", "Validation"), ("test", "Test")):
        if f"{split}_top1" in record:
            result = {k: record[f"{split}_{k}"] for k in ("loss", "top1", "top5")}
            engine.log_eval(run, name, epoch, result, best if split == select else "")
    return is_best


def report_result(run: engine.Run, select: str, report: str) -> tuple[float, float]:
    """Print the run's result: the final epoch's top-1 on the ``report`` split (the test set,
    the paper's figure), then the best epoch, chosen on the ``select`` split. Returns both."""
    final_top1 = run.history[-1][f"{report}_top1"]
    best_epoch = run.extra["best_epoch"]
    best_top1 = run.history[best_epoch - 1][f"{report}_top1"]
    if select == "test":
        best_line = (
            f"Best test top1 = {best_top1:.2%} at epoch {best_epoch} (chosen on the test set: "
            f"not comparable with the paper, which reports the final epoch)"
        )
    else:
        best_line = (
            f"Best epoch by validation top1 = {best_epoch} (val top1 {run.extra['best_top1']:.2%})"
        )
        if report == "test":
            best_line += f", its test top1 = {best_top1:.2%}"
    run.logger.info(f"Done: final {report} top1 {final_top1:.2%}; checkpoints in {run.dir}")
    if run.is_main:
        print(f"Final {report} top1 = {final_top1:.2%}")
        print(best_line)
    return final_top1, best_top1


def main(argv: list[str] | None = None) -> int:
    def prepare(argv: list[str]) -> tuple[AugmentConfig, Callable[[], Any]]:
        cfg = AugmentConfig.from_argv(argv)
        set_max_image_pixels(cfg.max_image_pixels)
        genotype = gt.load(cfg.genotype)  # parsed, never evaluated; before anything is written
        cfg.normalize = resolve_normalize(
            cfg.dataset, cfg.data_path, cfg.image_size, cfg.normalize, with_val=not cfg.no_test
        )
        init = init_weights(cfg, genotype)
        return cfg, lambda: train(cfg, genotype, init)

    return engine.script_main(__file__, RUN_ROOT, argv, prepare)


if __name__ == "__main__":
    sys.exit(main())
