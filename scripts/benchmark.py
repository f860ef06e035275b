"""Time the steps that search.py and augment.py run, with their conditions (STYLE.md, item 10).

    python scripts/benchmark.py                      # every figure at the CIFAR-10 shape
    python scripts/benchmark.py --only second_order  # one figure, in this process
    python scripts/benchmark.py --json               # one JSON object per figure
    python scripts/benchmark.py --count_ops          # ATen calls per figure (no timing)

Figures (what is timed is the code of the scripts, imported, not a copy):

- ``weight``: ``search.weight_step`` alone, the weight half of ``search.search_step``
  (forward, backward, clip, SGD);
- ``first_order`` / ``second_order`` / ``second_order_exact``: ``search.search_step`` with the
  Architect's first-order gradient, its second-order gradient with the finite-difference
  Hessian-vector product (the paper's) and with the exact one (double backward);
- ``augment``: ``augment.train_step`` on the DARTS_V2 network with its auxiliary head, with
  the arguments that augment.py's step passes it (the defaults' auxiliary weight, clipping and
  label smoothing; ``--dtype bfloat16`` as ``--amp bf16``).

The search figures call ``search.search_step`` as search.py's step does (the weight step
through the model the stage trains, the alpha step through the Architect), at the first epoch's
learning rate; tests/test_run_contract.py checks that both go through the same function.

Each figure is the median over ``--steps`` steps after ``--warmup`` steps. Peak memory is the
process's peak resident set (``ru_maxrss``) on the CPU, ``torch.cuda.max_memory_allocated`` on
CUDA. Because the RSS peak is a lifetime peak, the main invocation runs every figure in a fresh
subprocess of this script (``--only FIGURE --json``) and collects the results.

Shapes: the search figures default to the search defaults (batch 64, C = 16, 8 layers), the
augment figure to the augment defaults (batch 96, C = 36, 20 layers); ``--batch``,
``--channels`` and ``--layers`` set both.

``--count_ops`` counts instead of timing: the ATen operator calls of one step after one
warm-up step, every call that reaches an ATen kernel (forward, backward, optimizer), through a
``TorchDispatchMode`` (:class:`OpCounter`). Each is a dispatch on the CPU and a kernel launch
on a GPU, so the counts are the device-independent launch budget of a step. Its default
setting is the one of issue 22 for every figure: batch 2, C = 16, 8 layers, 3 x 32 x 32,
channels-last. Besides the figures above it counts ``forward`` (the supernet's forward in
training mode, with autograd recording). Two numbers per figure: all calls, and the calls
that are neither views (:func:`is_view_op`: ops whose schema says the output aliases an input,
such as view, permute, expand, slice, detach, as_strided) nor allocations (:data:`ALLOC_OPS`:
empty, zeros, ones, full and their _like / new_ variants, which only allocate or fill).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIGURES = ("weight", "first_order", "second_order", "second_order_exact", "augment")
COUNT_FIGURES = ("forward", "second_order", "weight", "augment")
COUNT_DEFAULTS = {"batch": 2, "channels": 16, "layers": 8}  # issue 22's setting, every figure
# Calls that only allocate (or fill a new tensor with a constant): left out of the second count.
ALLOC_OPS = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "zeros",
        "zeros_like",
        "new_zeros",
        "ones",
        "ones_like",
        "new_ones",
        "full",
        "full_like",
        "new_full",
        "scalar_tensor",
    }
)
SEARCH_DEFAULTS = {"batch": 64, "channels": 16, "layers": 8}
AUGMENT_DEFAULTS = {"batch": 96, "channels": 36, "layers": 20}
N_CLASSES = 10


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time DARTS' search and augment steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per stage)")
    p.add_argument("--size", type=int, default=32, help="image side (3 x size x size inputs)")
    p.add_argument("--channels", type=int, default=None, help="C (default: per stage)")
    p.add_argument("--layers", type=int, default=None, help="cells (default: per stage)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="bfloat16: autocast (CUDA only); the weights and the Hessian term stay float32",
    )
    p.add_argument(
        "--memory_format",
        default="channels_last",
        choices=("channels_last", "contiguous"),
        help="memory format of the networks and their inputs",
    )
    p.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "fast", "plain"),
        help="the models' formulations, as the scripts' --kernels (auto: fast on the CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--only",
        choices=FIGURES + ("forward",),
        default=None,
        help="measure one figure here (forward: with --count_ops only)",
    )
    p.add_argument(
        "--figures",
        default=",".join(FIGURES),
        help="comma list of the figures the main invocation measures",
    )
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object per figure")
    p.add_argument(
        "--count_ops",
        action="store_true",
        help="count the ATen calls of one step of each figure instead of timing it (defaults: "
        "batch 2, C 16, 8 layers; figures " + ",".join(COUNT_FIGURES) + ")",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --only: profile one more step and print the top ops (to stderr)",
    )
    return p


# --------------------------------------------------------------------------------------------
# One figure, in this process
# --------------------------------------------------------------------------------------------
def _shape(args: argparse.Namespace, figure: str) -> dict[str, int]:
    defaults = AUGMENT_DEFAULTS if figure == "augment" else SEARCH_DEFAULTS
    if getattr(args, "count_ops", False):
        defaults = COUNT_DEFAULTS
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: Any) -> tuple[int, str]:
    """(bytes, what was measured)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"  # KiB on Linux


def _build_step(figure: str, args: argparse.Namespace, device: Any) -> Callable[[], None]:
    """Build the model and optimisers of ``figure``; return a function doing one step."""
    import torch
    import torch.nn as nn

    import augment
    import genotypes as gt
    import search
    from architect import Architect
    from config import AugmentConfig, SearchConfig
    from models.augment_cnn import AugmentCNN
    from models.search_cnn import SearchCNNController

    s, a = SearchConfig(), AugmentConfig()  # the scripts' defaults (the paper's)
    try:
        from models.kernels import set_kernels
    except ImportError:  # a checkout from before --kernels: its only formulation
        pass
    else:
        set_kernels(args.kernels)

    shape = _shape(args, figure)
    torch.manual_seed(args.seed)
    channels_last = args.memory_format == "channels_last"

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(n, 3, args.size, args.size, device=device)
        if channels_last:
            X = X.contiguous(memory_format=torch.channels_last)
        return X, torch.randint(0, N_CLASSES, (n,), device=device)

    if figure == "augment":
        net = AugmentCNN(
            args.size, 3, shape["channels"], N_CLASSES, shape["layers"], True, gt.DARTS_V2
        ).to(device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        net.train()
        net.drop_path_prob(a.drop_path_prob)
        optim = augment.make_optimizer(net, a)
        X, y = batch(shape["batch"])
        amp = torch.bfloat16 if args.dtype == "bfloat16" else None  # as augment.py's --amp bf16

        def augment_step() -> None:
            # the arguments of augment.train's step (no gradient scaler: that is --amp fp16's)
            augment.train_step(
                net, optim, X, y, a.aux_weight, a.grad_clip, a.label_smoothing, amp, None
            )

        return augment_step

    model = SearchCNNController(
        3, shape["channels"], N_CLASSES, shape["layers"], nn.CrossEntropyLoss()
    ).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    w_optim, alpha_optim = search.optimizers(model, s)
    trn, val = batch(shape["batch"]), batch(shape["batch"])

    if figure == "forward":

        def forward() -> None:
            model(trn[0])  # training mode, autograd recording: the forward of a search step

        return forward

    if figure == "weight":

        def weight_step() -> None:
            search.weight_step(model, w_optim, trn, s.w_grad_clip)

        return weight_step

    hessian = "exact" if figure == "second_order_exact" else "finite"
    # (no hessian argument for "finite": the default, so that the script also times a checkout
    # from before --hessian existed, for a before/after comparison)
    kwargs = {"hessian": hessian} if hessian != "finite" else {}
    architect = Architect(model, s.w_momentum, s.w_weight_decay, **kwargs)
    first_order = figure == "first_order"

    def step() -> None:
        # search.search's step, at the first epoch's learning rate (xi of the virtual step)
        search.search_step(
            model, architect, w_optim, alpha_optim, trn, val, s.w_lr, first_order, s.w_grad_clip
        )

    return step


def _conditions(figure: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """What every figure is printed with: the device, PyTorch, layout, kernels and shape."""
    import torch

    shape = _shape(args, figure)
    return {
        "device": str(device),
        "torch": torch.__version__,
        "memory_format": args.memory_format,
        "kernels": args.kernels,
        "input": f"{shape['batch']}x3x{args.size}x{args.size}",
        "batch": shape["batch"],
        "size": args.size,
        "channels": shape["channels"],
        "layers": shape["layers"],
    }


def _autocast(figure: str, args: argparse.Namespace, device: Any) -> Any:
    """The autocast around a step of ``figure`` for ``--dtype bfloat16``: the whole search step
    (the search stage has no --amp of its own); none around the augment step, whose
    augment.train_step autocasts its forward itself, as in augment.py."""
    import contextlib

    import torch

    if args.dtype == "bfloat16" and figure != "augment":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(figure: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``figure`` in this process; return its result record."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif args.dtype != "float32":
        raise SystemExit("benchmark.py: --dtype bfloat16 is for CUDA only")
    allocator = "PyTorch's CUDA caching allocator" if device.type == "cuda" else "glibc, as set"
    if device.type == "cpu":  # as a CPU run of the scripts sets it (engine.Run.open)
        try:
            from utils import ConfigError, keep_freed_memory
        except ImportError:  # a checkout from before it: glibc's default
            pass
        else:
            try:
                kept = keep_freed_memory()
            except ConfigError as e:
                raise SystemExit(f"benchmark.py: {e}") from None
            if kept:
                allocator = "freed memory kept"
    load_before = os.getloadavg()[0]
    step = _build_step(figure, args, device)
    autocast = _autocast(figure, args, device)
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mem, mem_kind = _peak_memory(device)
    if args.profile:  # one more step, under the profiler: where the time goes, by op
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof, autocast:
            step()
            _sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)
    return {
        "figure": figure,
        "seconds": statistics.median(times),
        "times": times,
        "peak_memory_bytes": mem,
        "memory": mem_kind,
        **_conditions(figure, args, device),
        "device": str(device)
        if device.type == "cpu"
        else f"{device} ({torch.cuda.get_device_name(device)})",
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------------------------
# ATen call counts
# --------------------------------------------------------------------------------------------
def is_view_op(func: Any) -> bool:
    """Whether an ATen overload is a view: its schema says the output aliases an input
    (view, permute, expand, slice, select, unsqueeze, transpose, detach, as_strided, ...).
    In-place ops (add_, ...) alias their input too but compute: they are not views."""
    if func.is_view:
        return True
    schema = func._schema
    return bool(
        schema.returns
        and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    )


def op_counter() -> Any:
    """A ``TorchDispatchMode`` that counts the ATen calls made while it is active: ``counts``
    maps an op name (``aten.add``, overloads merged) to its calls, ``total`` and ``compute``
    (the calls that are neither views nor allocations, see the module docstring). Calls that
    autograd's backward makes are counted too: the mode is thread-local state that the
    autograd engine carries into its backward pass."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter[str] = Counter()
            self.views = 0
            self.allocs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            self.counts[f"aten.{name}"] += 1
            if name in ALLOC_OPS:
                self.allocs += 1
            elif is_view_op(func):
                self.views += 1
            return func(*args, **(kwargs or {}))

        @property
        def total(self) -> int:
            return sum(self.counts.values())

        @property
        def compute(self) -> int:
            return self.total - self.views - self.allocs

    return OpCounter()


def count_ops(figure: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ATen calls of one step of ``figure`` after one warm-up step (uncounted)."""
    import torch

    device = torch.device(args.device)
    step = _build_step(figure, args, device)
    autocast = _autocast(figure, args, device)
    with autocast:
        step()  # warm-up: optimizer state (momentum buffers, Adam moments) exists from here on
    counter = op_counter()
    with counter, autocast:
        step()
    return {
        "figure": figure,
        "calls": counter.total,
        "compute_calls": counter.compute,
        "views": counter.views,
        "allocations": counter.allocs,
        "top": counter.counts.most_common(10),
        **_conditions(figure, args, device),
    }


def format_count_line(r: dict[str, Any]) -> str:
    top = ", ".join(f"{n[5:]} {c:,}" for n, c in r["top"][:5])
    return (
        f"{r['figure']:<13} {r['calls']:>9,} ATen calls, {r['compute_calls']:>9,} without views "
        f"({r['views']:,}) and allocations ({r['allocations']:,})  (one step after a warm-up; "
        f"{r['device']}, PyTorch {r['torch']}, {r['memory_format']}, --kernels {r['kernels']}, "
        f"input {r['input']}, C={r['channels']}, {r['layers']} layers; top: {top})"
    )


def format_line(r: dict[str, Any]) -> str:
    mem = r["peak_memory_bytes"] / 2**30
    what = "peak RSS" if r["memory"] == "peak_rss" else "CUDA max allocated"
    return (
        f"{r['figure']:<19} {r['seconds']:8.3f} s/step  {what} {mem:6.2f} GiB  "
        f"(median of {r['steps']} after {r['warmup']} warm-up; {r['device']}, "
        f"PyTorch {r['torch']}, {r['threads']} threads, {r['dtype']}, {r['memory_format']}, "
        f"--kernels {r['kernels']}, allocator: {r.get('allocator', '?')}, "
        f"input {r['input']}, C={r['channels']}, {r['layers']} layers, "
        f"load {r['load_before']:.2f}->{r['load_after']:.2f})"
    )


# --------------------------------------------------------------------------------------------
# Orchestration: each figure in a fresh process
# --------------------------------------------------------------------------------------------
def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` without --only / --figures / --json (the child gets its own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--only", "--figures"):
            skip = True
            continue
        if a.startswith(("--only=", "--figures=")) or a == "--json":
            continue
        out.append(a)
    return out


def run_in_subprocess(figure: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *_child_argv(argv), "--only", figure]
    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    if ROOT not in sys.path:  # the scripts and models/ live one folder up
        sys.path.insert(0, ROOT)
    if args.profile and args.only is None:
        raise SystemExit("benchmark.py: --profile needs --only FIGURE (one figure, here)")
    if args.count_ops:  # counts do not depend on the process: all figures here
        for f in [args.only] if args.only is not None else COUNT_FIGURES:
            r = count_ops(f, args)
            print(json.dumps(r) if args.json else format_count_line(r), flush=True)
        return 0
    if args.only is not None:
        results = [measure(args.only, args)]
    else:
        figures = [f.strip() for f in args.figures.split(",") if f.strip()]
        unknown = sorted(set(figures) - set(FIGURES))
        if unknown:
            raise SystemExit(f"benchmark.py: unknown figure(s) {', '.join(unknown)}")
        results = []
        for f in figures:  # one at a time: two measurements at once would share the cores
            results.append(run_in_subprocess(f, argv))
            print(json.dumps(results[-1]) if args.json else format_line(results[-1]), flush=True)
        return 0
    for r in results:
        print(json.dumps(r) if args.json else format_line(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
