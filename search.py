"""DARTS search: train the supernet weights and the architecture alternately, derive the cell.

    python search.py --name cifar10 --dataset cifar10
    python search.py --name mnist --dataset mnist --first_order

Writes searchs/<name>/: search.log, config.json, tb/ (tensorboard), alphas.jsonl (softmaxed
alphas per epoch), genotypes.txt (one genotype per epoch), plots/ (cells per epoch),
checkpoint.pth.tar and genotype.txt (the final genotype).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

import genotypes as gt
import utils
from architect import Architect
from config import ConfigError, SearchConfig
from models.search_cnn import SearchCNNController
from preproc import dataset_info, get_dataset

RUN_ROOT = "searchs"


def search_step(
    model: SearchCNNController | DistributedDataParallel,
    architect: Architect,
    w_optim: torch.optim.Optimizer,
    alpha_optim: torch.optim.Optimizer,
    trn: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    first_order: bool,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of DARTS' alternating optimisation (paper, Algorithm 1).

    1. architecture step on the validation batch (second order unless ``first_order``);
    2. weight step on the training batch with the updated alphas.
    ``model`` is the controller, or the controller wrapped in DDP (which then averages the
    weight gradients across processes). Returns the training loss and logits of the weight
    step (detached).
    """
    net = model.module if isinstance(model, DistributedDataParallel) else model
    trn_X, trn_y = trn
    val_X, val_y = val
    alpha_optim.zero_grad(set_to_none=True)
    if first_order:
        architect.first_order_backward(val_X, val_y)
    else:
        architect.unrolled_backward(trn_X, trn_y, val_X, val_y, lr, w_optim)
    alpha_optim.step()

    w_optim.zero_grad(set_to_none=True)
    with net.alphas_frozen():  # the weight step needs no alpha gradient
        logits = model(trn_X)
        loss = net.criterion(logits, trn_y)
        loss.backward()
    nn.utils.clip_grad_norm_(net.weights(), grad_clip)
    w_optim.step()
    return loss.detach(), logits.detach()


def make_loaders(
    cfg: SearchConfig, pin: bool, dist_info: utils.DistInfo | None = None
) -> tuple[DataLoader, DataLoader, DataLoader | None, torch.Generator]:
    """Split the training set into: the held-out selection split (``select_portion``), then the
    weight half and the alpha half (``train_portion`` of the rest). The split is fixed by the
    seed; the batch order comes from one generator so a run is reproducible."""
    train_data = get_dataset(cfg.dataset, cfg.data_path, train=True, augment=True)
    n = len(train_data)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_select = int(cfg.select_portion * n)
    rest = perm[n_select:]
    n_w = int(cfg.train_portion * len(rest))
    w_idx, a_idx = rest[:n_w], rest[n_w:]
    if not w_idx or not a_idx:
        raise ConfigError(
            f"the {cfg.dataset} training set ({n} images) is too small for "
            f"--train_portion {cfg.train_portion}"
        )
    # Workers are not persistent: each epoch re-seeds them from `gen`, so a resumed run draws
    # the same augmentations as an uninterrupted one.
    # Under DDP each process takes its own disjoint shard, all of one size, so every process
    # runs the same number of steps.
    dist_info = dist_info or utils.DistInfo()
    world, rank = dist_info.world_size, dist_info.rank
    w_idx = w_idx[rank::world][: len(w_idx) // world]
    a_idx = a_idx[rank::world][: len(a_idx) // world]
    if not w_idx or not a_idx:
        raise ConfigError(f"the {cfg.dataset} training set ({n} images) is too small to shard")
    gen = torch.Generator().manual_seed(cfg.seed)
    common: dict[str, Any] = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=pin,
        generator=gen,  # batch order and worker seeds: saved and restored on resume
    )
    train_loader = DataLoader(
        train_data, sampler=SubsetRandomSampler(w_idx, generator=gen), **common
    )
    valid_loader = DataLoader(
        train_data, sampler=SubsetRandomSampler(a_idx, generator=gen), **common
    )
    select_loader = None
    if n_select:
        eval_data = get_dataset(cfg.dataset, cfg.data_path, train=True, augment=False)
        select_loader = DataLoader(
            Subset(eval_data, perm[:n_select][rank::world]),  # evaluate() sums the shards
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=pin,
        )
    return train_loader, valid_loader, select_loader, gen


def train_epoch(
    cfg: SearchConfig,
    model: SearchCNNController | DistributedDataParallel,
    architect: Architect,
    loaders: tuple[DataLoader, DataLoader],
    w_optim: torch.optim.Optimizer,
    alpha_optim: torch.optim.Optimizer,
    lr: float,
    epoch: int,
    device: torch.device,
    logger,
    writer,
    global_step: int,
    run_dir: str,
) -> tuple[dict, int]:
    model.train()
    meters = utils.Meters()
    train_loader, valid_loader = loaders
    n_steps = min(len(train_loader), len(valid_loader))
    steps = utils.progress(
        zip(train_loader, valid_loader), n_steps, f"Epoch {epoch}", not cfg.no_progress
    )
    for step, (trn, val) in enumerate(steps):
        trn = tuple(t.to(device, non_blocking=True) for t in trn)
        val = tuple(t.to(device, non_blocking=True) for t in val)
        loss, logits = search_step(
            model, architect, w_optim, alpha_optim, trn, val, lr, cfg.first_order, cfg.w_grad_clip
        )
        if not torch.isfinite(loss):
            raise utils.NonFiniteLossError(
                f"non-finite training loss at epoch {epoch} step {step}; the last good "
                f"checkpoint is {utils.last_checkpoint(run_dir)}"
            )
        meters.update(loss, logits, trn[1])
        global_step += 1
        writer.add_scalar("train/loss", loss.item(), global_step)
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{meters.loss.avg:.3f}", top1=f"{meters.top1.avg:.1%}")
        if step % cfg.print_freq == 0 or step == n_steps - 1:
            logger.info(
                f"Train: [{epoch:3d}/{cfg.epochs}] step {step:03d}/{n_steps - 1:03d} {meters}"
            )
    return meters.summary(), global_step


def write_history(run_dir: str, history: list[dict[str, Any]], writer: Any, can_plot: bool) -> None:
    """Everything a user looks at after an epoch, rebuilt from the checkpointed history so a
    resumed run never duplicates or loses an epoch: alphas.jsonl, genotypes.txt, metrics.jsonl,
    and under plots/ the training curves, the alpha heatmaps of the epoch, the op weights over
    the epochs and (with graphviz) the cell GIFs."""
    import visualize

    plots = os.path.join(run_dir, "plots")
    alphas = [{"epoch": h["epoch"], **h["alphas"]} for h in history]
    visualize.write_jsonl(os.path.join(run_dir, "alphas.jsonl"), alphas)
    visualize.write_jsonl(
        os.path.join(run_dir, "metrics.jsonl"),
        [{k: v for k, v in h.items() if k != "alphas"} for h in history],
    )
    with open(os.path.join(run_dir, "genotypes.txt"), "w") as f:
        for h in history:
            f.write(f"epoch {h['epoch']}: {h['genotype']}\n")

    last = history[-1]
    epoch = last["epoch"]
    visualize.plot_curves(history, os.path.join(plots, "curves.png"), "val")
    visualize.plot_op_weights(alphas, gt.PRIMITIVES, os.path.join(plots, "op_weights.png"))
    for kind in ("normal", "reduce"):
        title = f"{kind} cell, epoch {epoch}"
        visualize.plot_alpha_heatmap(
            last["alphas"][kind],
            gt.PRIMITIVES,
            title,
            os.path.join(plots, f"epoch_{epoch:03d}-alphas-{kind}.png"),
        )
        writer.add_figure(
            f"alphas/{kind}",
            visualize.heatmap_figure(last["alphas"][kind], gt.PRIMITIVES, title),
            epoch,
        )
    if can_plot:
        visualize.update_cell_gifs(plots)


def run(cfg: SearchConfig) -> gt.Genotype:
    dist_info, device = utils.init_distributed(cfg)
    is_main = dist_info.is_main  # only the first process writes logs, plots and checkpoints
    info = dataset_info(cfg.dataset)
    run_dir = os.path.join(RUN_ROOT, cfg.name)
    # Data, settings and the run folder are checked before anything is written.
    resumed = utils.open_run(run_dir, cfg)
    train_loader, valid_loader, select_loader, data_gen = make_loaders(
        cfg, pin=device.type == "cuda", dist_info=dist_info
    )
    utils.make_run_dir(run_dir)
    logger = utils.get_logger(os.path.join(run_dir, "search.log"), "darts.search", is_main)
    logger.info(f"Search on {device} (PyTorch {torch.__version__}) with config:\n{cfg}")
    if is_main:
        cfg.save(os.path.join(run_dir, "config.json"))
    # The same seed in every process: the same initial alphas and weights, and RNG streams that
    # the checkpoint of the first process restores for all of them.
    utils.set_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = SearchCNNController(
        info.input_channels,
        cfg.init_channels,
        info.n_classes,
        cfg.layers,
        nn.CrossEntropyLoss(),
        n_nodes=cfg.nodes,
    ).to(device)
    model.to(memory_format=utils.memory_format(cfg))
    logger.info(
        f"Supernet: {utils.count_parameters(model.net):,} weights, "
        f"{utils.count_parameters(model, exclude='net.'):,} alphas"
    )
    w_optim = torch.optim.SGD(
        model.weights(), cfg.w_lr, momentum=cfg.w_momentum, weight_decay=cfg.w_weight_decay
    )
    alpha_optim = torch.optim.Adam(
        model.alphas(), cfg.alpha_lr, betas=(0.5, 0.999), weight_decay=cfg.alpha_weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        w_optim, cfg.epochs, eta_min=cfg.w_lr_min
    )
    architect = Architect(model, cfg.w_momentum, cfg.w_weight_decay, hessian=cfg.hessian)
    # The weight step runs through DDP (it averages the weight gradients); the Architect
    # averages its own gradients. Alphas are not DDP's business.
    train_model = utils.wrap_ddp(
        model, dist_info, device, ignore=[n for n, _ in model.named_alphas()]
    )

    history: list[dict[str, Any]] = []
    best_top1, best_genotype, global_step, start = -1.0, "", 0, 1
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        w_optim.load_state_dict(resumed["w_optim"])
        alpha_optim.load_state_dict(resumed["alpha_optim"])
        scheduler.load_state_dict(resumed["scheduler"])
        utils.set_rng_state(resumed["rng"], data_gen)
        history, best_top1 = resumed["history"], resumed["best_top1"]
        best_genotype, global_step = resumed["best_genotype"], resumed["global_step"]
        start = resumed["epoch"] + 1
        logger.info(f"Resumed from {run_dir}/{utils.CHECKPOINT} after epoch {resumed['epoch']}")

    from tensorboardX import SummaryWriter  # a heavy import, only needed when a run starts

    import visualize

    # purge_step drops what an interrupted run logged after its last checkpoint.
    writer = (
        utils.NullWriter()
        if not is_main
        else SummaryWriter(
            log_dir=os.path.join(run_dir, "tb"), purge_step=global_step + 1 if resumed else None
        )
    )
    can_plot = visualize.dot_available()
    if not can_plot:
        logger.warning(
            "WARNING: graphviz's `dot` was not found: cell plots are skipped "
            "(apt-get install graphviz to get them)"
        )
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        lr = float(scheduler.get_last_lr()[0])
        train, global_step = train_epoch(
            cfg,
            train_model,
            architect,
            (train_loader, valid_loader),
            w_optim,
            alpha_optim,
            lr,
            epoch,
            device,
            logger,
            writer,
            global_step,
            run_dir,
        )
        scheduler.step()
        utils.broadcast_buffers(model)  # the BN statistics of the checkpoint, in every process
        genotype = gt.to_str(model.genotype())
        alphas = model.softmax_alphas()
        logger.info(
            f"Epoch {epoch}: softmaxed alphas (rows: edges, columns: {', '.join(gt.PRIMITIVES)})"
        )
        for kind in ("normal", "reduce"):
            for i, a in enumerate(alphas[kind]):
                logger.info(f"  {kind} node {i + gt.N_INPUT_NODES}:\n{a.numpy().round(3)}")
        logger.info(f"Epoch {epoch}: genotype = {genotype}")
        if can_plot and is_main:
            visualize.plot_genotype(
                model.genotype(),
                os.path.join(run_dir, "plots"),
                caption=f"Epoch {epoch}",
                prefix=f"epoch_{epoch:03d}-",
            )

        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            **{f"train_{k}": v for k, v in train.items()},
        }
        if select_loader is not None:
            held = utils.evaluate(model, select_loader, device, model.criterion)
            record.update({f"val_{k}": v for k, v in held.items()})
            logger.info(
                f"Held-out selection split: [{epoch:3d}/{cfg.epochs}] "
                f"loss {held['loss']:.3f} top1 {held['top1']:.2%} "
                f"top5 {held['top5']:.2%}"
            )
            if held["top1"] > best_top1:
                best_top1, best_genotype = held["top1"], genotype
        else:
            best_genotype = genotype
        record["time"] = time.time() - t0
        for k, v in record.items():
            if k != "epoch":
                writer.add_scalar(k.replace("_", "/", 1), v, epoch)
        history.append(
            {
                **record,
                "genotype": genotype,
                "alphas": {k: [a.tolist() for a in v] for k, v in alphas.items()},
            }
        )

        if not is_main:
            continue
        utils.save_checkpoint(
            {
                "model": model.state_dict(),
                "w_optim": w_optim.state_dict(),
                "alpha_optim": alpha_optim.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "best_top1": best_top1,
                "best_genotype": best_genotype,
                "history": history,
                "config": cfg.to_dict(),
                "rng": utils.rng_state(data_gen),
            },
            os.path.join(run_dir, utils.CHECKPOINT),
        )
        t_plot = time.time()
        write_history(run_dir, history, writer, can_plot)
        logger.info(
            f"Epoch {epoch} done in {time.time() - t0:.1f}s "
            f"(files and plots {time.time() - t_plot:.1f}s)"
        )

    writer.close()
    final = model.genotype()
    if dist_info.enabled:
        same = utils.replicas_identical(model)
        logger.info(
            f"DDP: weights, alphas and BN statistics are {'identical' if same else 'DIFFERENT'} "
            f"on the {dist_info.world_size} processes"
        )
    if not is_main:
        return final
    with open(os.path.join(run_dir, "genotype.txt"), "w") as f:
        f.write(gt.to_str(final) + "\n")
    if select_loader is not None:
        logger.info(f"Best held-out top1 of the supernet = {best_top1:.2%}")
    else:
        logger.info(
            "No held-out selection split (--select_portion 0): the best genotype is the final one"
        )
    print(f"Final genotype = {gt.to_str(final)}")
    print(f"Best genotype = {best_genotype or gt.to_str(final)}")
    logger.info(f"Final genotype written to {os.path.join(run_dir, 'genotype.txt')}")
    return final


def main(argv: list[str] | None = None) -> int:
    def prepare(argv: list[str]) -> tuple[SearchConfig, Callable[[], Any]]:
        cfg = SearchConfig.from_argv(argv)
        return cfg, lambda: run(cfg)

    return utils.script_main(__file__, RUN_ROOT, argv, prepare)


if __name__ == "__main__":
    sys.exit(main())
