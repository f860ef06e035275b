"""DARTS search: train the supernet weights and the architecture alternately, derive the cell.

    python search.py --name cifar10 --dataset cifar10
    python search.py --name mnist --dataset mnist --first_order

Writes searchs/<name>/: search.log, config.json, tb/ (tensorboard), alphas.jsonl (softmaxed
alphas per epoch), genotypes.txt (one genotype per epoch), metrics.jsonl, plots/ (cells per
epoch), checkpoint.pth.tar and genotype.txt (the final genotype).

The loop, the run folder and the checkpoints are engine.py's; this file holds the model, the
data split, the step of the paper's Algorithm 1 (:func:`search_step`, the function that
scripts/benchmark.py times) and the stage around them (:func:`search`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset, SubsetRandomSampler

import collapse
import engine
import genotypes as gt
from architect import Architect
from config import ConfigError, SearchConfig
from distributed import DistInfo, unwrap, wrap_ddp
from models.search_cnn import SearchCNNController
from preproc import dataset_info, get_dataset, resolve_normalize, set_max_image_pixels
from utils import clip_grad_norm, count_parameters, write_jsonl

RUN_ROOT = "searchs"
Batch = tuple[torch.Tensor, torch.Tensor]


def arch_step(
    architect: Architect,
    alpha_optim: torch.optim.Optimizer,
    trn: Batch,
    val: Batch,
    lr: float,
    w_optim: torch.optim.Optimizer,
    first_order: bool,
) -> None:
    """The architecture step (Algorithm 1, step 1): Adam on the alphas with the gradient of the
    validation loss, second order (eq. 7-8, ``lr`` is xi) unless ``first_order`` (xi = 0)."""
    alpha_optim.zero_grad(set_to_none=True)
    if first_order:
        architect.first_order_backward(*val)
    else:
        architect.unrolled_backward(*trn, *val, lr, w_optim)
    alpha_optim.step()


def weight_step(
    model: SearchCNNController | DistributedDataParallel,
    w_optim: torch.optim.Optimizer,
    trn: Batch,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight step (Algorithm 1, step 2): SGD on the training batch with the current alphas,
    gradient-norm clipping on the weights. ``model`` is the controller, or the controller in DDP
    (which then averages the weight gradients). Returns the loss and logits (detached)."""
    net = cast(SearchCNNController, unwrap(model))
    X, y = trn
    w_optim.zero_grad(set_to_none=True)
    with net.alphas_frozen():  # the weight step needs no alpha gradient
        logits = model(X)
        loss = net.criterion(logits, y)
        loss.backward()
    clip_grad_norm(net.weights(), grad_clip)
    w_optim.step()
    return loss.detach(), logits.detach()


def optimizers(
    model: SearchCNNController, cfg: SearchConfig
) -> tuple[torch.optim.SGD, torch.optim.Adam]:
    """The weights' SGD and the alphas' Adam (paper, section 3.1.1). foreach: one call per
    operation over all tensors on the CPU too (torch's default there is a loop of calls per
    tensor); the same arithmetic."""
    w_optim = torch.optim.SGD(
        model.weights(),
        cfg.w_lr,
        momentum=cfg.w_momentum,
        weight_decay=cfg.w_weight_decay,
        foreach=True,
    )
    alpha_optim = torch.optim.Adam(
        model.alphas(),
        cfg.alpha_lr,
        betas=(0.5, 0.999),
        weight_decay=cfg.alpha_weight_decay,
        foreach=True,
    )
    return w_optim, alpha_optim


def search_step(
    model: SearchCNNController | DistributedDataParallel,
    architect: Architect,
    w_optim: torch.optim.Optimizer,
    alpha_optim: torch.optim.Optimizer,
    trn: Batch,
    val: Batch,
    lr: float,
    first_order: bool,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of DARTS' alternating optimisation (paper, Algorithm 1): :func:`arch_step` on
    the validation batch, then :func:`weight_step` on the training batch with the updated
    alphas. Returns the training loss and logits of the weight step."""
    arch_step(architect, alpha_optim, trn, val, lr, w_optim, first_order)
    return weight_step(model, w_optim, trn, grad_clip)


def make_loaders(
    cfg: SearchConfig,
    pin: bool,
    dist_info: DistInfo | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Any, Any, Any | None, torch.Generator]:
    """Split the training set into: the held-out selection split (``select_portion``, this
    project's addition; 0 by default, the paper's split), then the weight half and the alpha
    half (``train_portion`` of the rest). The split is fixed by the seed; the batch order comes
    from ``generator`` (seeded with the seed when not given), so a run is reproducible."""
    data = functools.partial(
        get_dataset, cfg.dataset, cfg.data_path, image_size=cfg.image_size, normalize=cfg.normalize
    )
    train_data = data(train=True, augment=True)
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
    # Under DDP each process takes its own disjoint shard, all of one size, so every process
    # runs the same number of steps.
    dist_info = dist_info or DistInfo()
    world, rank = dist_info.world_size, dist_info.rank
    w_idx = w_idx[rank::world][: len(w_idx) // world]
    a_idx = a_idx[rank::world][: len(a_idx) // world]
    if not w_idx or not a_idx:
        raise ConfigError(f"the {cfg.dataset} training set ({n} images) is too small to shard")
    # Workers are not persistent: each epoch re-seeds them from `gen`, so a resumed run draws
    # the same augmentations as an uninterrupted one.
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    common: dict[str, Any] = dict(batch_size=cfg.batch_size, workers=cfg.workers, pin=pin)
    train_loader = engine.data_loader(
        train_data, sampler=SubsetRandomSampler(w_idx, generator=gen), generator=gen, **common
    )
    valid_loader = engine.data_loader(
        train_data, sampler=SubsetRandomSampler(a_idx, generator=gen), generator=gen, **common
    )
    select_loader = None
    if n_select:
        eval_data = data(train=True, augment=False)
        # evaluate() sums the shards of the processes
        select_loader = engine.data_loader(
            Subset(eval_data, perm[:n_select][rank::world]), **common
        )
    return train_loader, valid_loader, select_loader, gen


def write_history(run: engine.Run, can_plot: bool) -> None:
    """What a user looks at after an epoch, rebuilt from the checkpointed history: alphas.jsonl,
    genotypes.txt, and under plots/ the training curves, the alpha heatmaps of the epoch, the op
    weights over the epochs and (with graphviz) the cell GIFs."""
    import visualize

    history, plots = run.history, run.path("plots")
    alphas = [{"epoch": h["epoch"], **h["alphas"]} for h in history]
    write_jsonl(run.path("alphas.jsonl"), alphas)
    with open(run.path("genotypes.txt"), "w") as f:
        for h in history:
            f.write(f"epoch {h['epoch']}: {h['genotype']}\n")
    last = history[-1]
    epoch = last["epoch"]
    visualize.plot_curves(history, os.path.join(plots, "curves.png"), "val")
    visualize.plot_op_weights(alphas, gt.PRIMITIVES, os.path.join(plots, "op_weights.png"))
    visualize.plot_skip_counts(history, os.path.join(plots, "skip_counts.png"))
    for kind in ("normal", "reduce"):
        title = f"{kind} cell, epoch {epoch}"
        png = os.path.join(plots, f"epoch_{epoch:03d}-alphas-{kind}.png")
        visualize.plot_alpha_heatmap(last["alphas"][kind], gt.PRIMITIVES, title, png)
        # tensorboard gets the pixels just drawn: drawing the figure again took as long
        run.writer.add_image(f"alphas/{kind}", visualize.read_png(png), epoch, dataformats="HWC")
    if can_plot:
        visualize.plot_genotype(
            gt.from_str(last["genotype"]), plots, f"Epoch {epoch}", f"epoch_{epoch:03d}-"
        )
        visualize.update_cell_gifs(plots)


def log_alphas(run: engine.Run, model: SearchCNNController, epoch: int) -> dict[str, list]:
    """Log the softmaxed alphas and the genotype of the epoch; return the alphas as lists."""
    alphas = model.softmax_alphas()
    run.logger.info(
        f"Epoch {epoch}: softmaxed alphas (rows: edges, columns: {', '.join(gt.PRIMITIVES)})"
    )
    for kind in ("normal", "reduce"):
        for i, a in enumerate(alphas[kind]):
            run.logger.info(f"  {kind} node {i + gt.N_INPUT_NODES}:\n{a.numpy().round(3)}")
    run.logger.info(f"Epoch {epoch}: genotype = {gt.to_str(model.genotype())}")
    return {k: [a.tolist() for a in v] for k, v in alphas.items()}


def derive_final(
    normal: Sequence[torch.Tensor], reduce: Sequence[torch.Tensor], max_skip: int
) -> tuple[gt.Genotype, str]:
    """The final genotype from the alphas of the two cell types (or their logarithms: the
    derivation only sees their softmax), with ``--max_skip`` applied to the normal cell when
    set. Returns it and a note for the genotype line ("" when no constraint applied)."""
    concat = range(gt.N_INPUT_NODES, gt.N_INPUT_NODES + len(normal))
    note = ""
    if max_skip:
        cell, replaced = gt.parse_max_skip(normal, max_skip, k=2)
        if replaced:
            note = f" (--max_skip {max_skip}: {replaced} skip-connect(s) replaced)"
    else:
        cell = gt.parse(normal, k=2)
    return gt.Genotype(cell, concat, gt.parse(reduce, k=2), concat), note


def search(cfg: SearchConfig) -> gt.Genotype:
    """The search stage: the supernet trained by :func:`search_step` for ``--epochs``, the
    alphas, genotype and plots of every epoch, then the final genotype (with ``--max_skip``,
    or the early stop's epoch), printed and written to genotype.txt. Returns it."""
    import visualize

    info = dataset_info(cfg.dataset, cfg.data_path, cfg.image_size)
    with engine.Run.open(cfg, RUN_ROOT, "search") as run:
        train_loader, valid_loader, select_loader, _ = make_loaders(
            cfg, run.pin_memory, run.dist, run.data_gen
        )
        run.start("Search")
        model = SearchCNNController(
            info.input_channels, cfg.init_channels, info.n_classes, cfg.layers,
            nn.CrossEntropyLoss(), n_nodes=cfg.nodes,
        )  # fmt: skip
        model = run.place(model)
        run.logger.info(
            f"Supernet: {count_parameters(model.net):,} weights, "
            f"{count_parameters(model, exclude='net.'):,} alphas"
        )
        w_optim, alpha_optim = optimizers(model, cfg)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optim, cfg.epochs, cfg.w_lr_min)
        architect = Architect(model, cfg.w_momentum, cfg.w_weight_decay, hessian=cfg.hessian)
        # The weight step runs through DDP (it averages the weight gradients); the Architect
        # averages its own gradients. Alphas are not DDP's business.
        alpha_names = [n for n, _ in model.named_alphas()]
        train_model = wrap_ddp(model, run.dist, run.device, ignore=alpha_names)
        # The checkpoint: these state_dicts and counters (restored here on --resume), an
        # "early_stop" record once --early_stop fires, and what Run adds to every checkpoint
        # (engine.RUN_KEYS): epoch, global_step, history (every epoch's record and alphas),
        # config, code_version (the commit), rng (the Python, NumPy, torch and CUDA states,
        # and the batch order's).
        run.track(
            model=model,  # weights, alphas and BN statistics
            w_optim=w_optim,
            alpha_optim=alpha_optim,
            scheduler=scheduler,
            extra={"best_top1": -1.0, "best_genotype": ""},  # by the held-out split
        )
        # --hessian_eigen: the probe's fixed batches, un-augmented images of the alpha half
        # chosen by the seed (the same in a resumed run; no random stream is touched).
        probe = None
        if cfg.hessian_eigen:
            with torch.random.fork_rng(devices=[]):
                plain = get_dataset(
                    cfg.dataset, cfg.data_path, train=True, augment=False,
                    image_size=cfg.image_size, normalize=cfg.normalize,
                )  # fmt: skip
                batches = collapse.fixed_batches(
                    plain, list(valid_loader.sampler.indices), cfg.seed,
                    collapse.EIGEN_BATCHES, cfg.batch_size, run.device,
                )  # fmt: skip
            probe = collapse.HessianProbe(batches, cfg.seed)
        stopped = run.resumed.get("early_stop") if run.resumed is not None else None
        if stopped:
            run.extra["early_stop"] = stopped
            run.logger.info(
                f"This run stopped early at epoch {stopped['epoch']} (--early_stop "
                f"{cfg.early_stop}): it has finished; nothing to resume"
            )
        can_plot = visualize.dot_available()
        if not can_plot:
            run.logger.warning(
                "WARNING: graphviz's `dot` was not found: cell plots are skipped "
                "(apt-get install graphviz to get them)"
            )

        def step(batch: tuple[Batch, Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            trn, val = batch
            lr = float(scheduler.get_last_lr()[0])  # xi of the virtual step: the epoch's lr
            loss, logits = search_step(
                train_model, architect, w_optim, alpha_optim, trn, val, lr,
                cfg.first_order, cfg.w_grad_clip,
            )  # fmt: skip
            return loss, logits, trn[1]

        loaders = engine.Paired(train_loader, valid_loader)
        for epoch in [] if stopped else run.epochs():
            lr = float(scheduler.get_last_lr()[0])
            train = engine.train_one_epoch(run, step, loaders, epoch)
            scheduler.step()
            alphas = log_alphas(run, model, epoch)
            genotype = gt.to_str(model.genotype())
            record: dict[str, Any] = {"epoch": epoch, "lr": lr}
            record.update({f"train_{k}": v for k, v in train.items()})
            if select_loader is not None:
                held = engine.evaluate(model, select_loader, run.device, model.criterion)
                record.update({f"val_{k}": v for k, v in held.items()})
                engine.log_eval(run, "Held-out selection split", epoch, held)
                if held["top1"] > run.extra["best_top1"]:
                    run.extra["best_top1"] = held["top1"]
                    run.extra["best_genotype"] = genotype
            record.update(collapse.cell_stats(model.genotype()))  # always on: the skip count
            if probe is not None and epoch % cfg.hessian_eigen == 0:
                eig = probe(model, epoch)
                record["hessian_eigen"] = eig.value
                record["hessian_eigen_time"] = eig.seconds  # its cost, next to the epoch's time
                run.logger.info(
                    f"Epoch {epoch}: dominant eigenvalue of the alpha Hessian = {eig.value:.6g} "
                    f"({eig.products} Hessian-vector products, {eig.seconds:.2f}s)"
                )
            record["genotype"] = genotype
            stop = collapse.stop_decision(cfg.early_stop, [*run.history, record])
            if stop is not None:
                run.extra["early_stop"] = stop.to_dict()  # the checkpoint records the stop
            files = lambda: write_history(run, can_plot)  # noqa: E731
            engine.log_skipped_files(run, train_loader)
            run.end_epoch(record, {"alphas": alphas}, write_files=files)
            if stop is not None:
                stopped = run.extra["early_stop"]
                break

        run.check_replicas("weights, alphas and BN statistics")
        normal, reduce = list(model.alpha_normal), list(model.alpha_reduce)
        if stopped:
            # The genotype of the epoch the rule names, from its softmaxed alphas in the history
            # (the derivation only sees the softmax, and softmax(log p) = p).
            (row,) = [h for h in run.history if h["epoch"] == stopped["final_epoch"]]
            normal, reduce = (
                [torch.tensor(a).log() for a in row["alphas"][k]] for k in ("normal", "reduce")
            )
        final, note = derive_final(normal, reduce, cfg.max_skip)
        if stopped:
            line = (
                f"Early stop at epoch {stopped['epoch']} of {cfg.epochs} (--early_stop "
                f"{cfg.early_stop}): {stopped['reason']}; the final genotype is epoch "
                f"{stopped['final_epoch']}'s"
            )
            run.logger.info(line)
            if run.is_main:
                print(line)
            note = f" (epoch {stopped['final_epoch']}, early stop){note}"
        if not run.is_main:
            return final
        with open(run.path("genotype.txt"), "w") as f:
            f.write(gt.to_str(final) + "\n")
        if note:
            run.logger.info(f"Final genotype{note}")
        print(f"Final genotype{note} = {gt.to_str(final)}")
        if select_loader is not None:
            best = run.extra["best_genotype"]
            run.logger.info(
                f"Best genotype: the epoch with the best top-1 of the supernet on the held-out "
                f"split (--select_portion), {run.extra['best_top1']:.2%}"
            )
            print(f"Best genotype = {best}")
        else:
            run.logger.info(
                "No held-out selection split (--select_portion 0, the paper's split): the final "
                "genotype is the result"
            )
        run.logger.info(f"Final genotype written to {run.path('genotype.txt')}")
        return final


def main(argv: list[str] | None = None) -> int:
    def prepare(argv: list[str]) -> tuple[SearchConfig, Callable[[], Any]]:
        cfg = SearchConfig.from_argv(argv)
        set_max_image_pixels(cfg.max_image_pixels)
        cfg.normalize = resolve_normalize(cfg.dataset, cfg.data_path, cfg.image_size, cfg.normalize)
        return cfg, lambda: search(cfg)

    return engine.script_main(__file__, RUN_ROOT, argv, prepare)


if __name__ == "__main__":
    sys.exit(main())
