"""One command that checks this project on a CUDA GPU and writes down what it found.

    python scripts/gpu_check.py                         # on a GPU: every step (sized for 8 min)
    python scripts/gpu_check.py --device cpu --tiny     # the steps a CPU can run, tiny sizes
    python scripts/gpu_check.py --out DIR --only alpha_gradient,ddp

Writes ``<out>/report.md`` and ``<out>/report.json`` (``--out``, default ``gpu_check/``); the
runs it starts live in ``<out>/work/`` (emptied first), their output in ``<out>/work/logs/``.
Each step is timed and reported as passed, failed (with its last lines) or skipped (with the
reason). The steps run the project's own scripts (as subprocesses, as a user would) or call its
modules; nothing here re-implements what they do.

1. ``versions``: Python, PyTorch, CUDA, cuDNN, NCCL; the GPU, its compute capability and
   memory; the TF32 settings PyTorch started with.
2. ``alpha_gradient``: the second-order alpha gradient (architect.Architect, finite and exact
   Hessian-vector product) of one supernet (C=8, 5 layers, batch 64 of 3x16x16) on the device,
   against the same computation on the CPU in float64. Tolerances: float64 on the device within
   1e-6 (the exact check of the CUDA code path); float32 on the device (TF32 off) within 4
   times the error of float32 on the CPU, or 1e-5 if larger. That error is not small: at
   initialisation on random data the supernet amplifies float32 rounding (on this CPU, 0.3%
   with the exact product, 2.4% with the finite difference, which also picks up ReLU kinks;
   the weight gradient of the stem is a difference of large terms through its batch norm).
   With ``--allow_tf32`` (the product itself stays TF32-free) and with TF32 forced into the
   product too: for the record.
3. ``search_resume``: a 2-epoch digits search, stopped by SIGTERM after epoch 1 and resumed,
   against an uninterrupted run: metrics, alphas and genotypes.
4. ``augment_amp``: one epoch of augment in float32, bfloat16 and float16 (its gradient scaler
   must be in the checkpoint), each checkpoint evaluated by evaluate.py.
5. ``official_fixture``: the authors' weights (tests/fixtures/official) on the device against
   the logits their code computed.
6. ``benchmark``: scripts/benchmark.py at the paper's shapes (weight step, second-order step,
   augment step), float32 and bfloat16, both memory formats, and the per-op profile of the
   second-order step.
7. ``ddp``: torchrun with one process, and two processes on one GPU with gloo
   (``DARTS_DIST_BACKEND=gloo``: NCCL takes one process per GPU).
8. ``protocol``: scripts/protocol.py with ``--gpus 0`` at tiny settings.

Exit status 0 when no step failed, 1 when one did, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the scripts and models/ live one folder up
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import distributed  # noqa: E402

STEPS = (
    "versions",
    "alpha_gradient",
    "search_resume",
    "augment_amp",
    "official_fixture",
    "benchmark",
    "ddp",
    "protocol",
)
LAST_LINES = 25  # of a failed step's output, in the report
RUN_TIMEOUT = 600  # seconds, for any one process a step starts
CPU_FP32_FACTOR, FLOOR, FP64_TOL = 4.0, 1e-5, 1e-6  # alpha_gradient's tolerances (see above)
FIXTURE_TOL = {"cpu": 1e-5, "cuda": 1e-4}  # official_fixture: max |got - want| / max |want|


class Skip(Exception):
    """The step cannot run here; the message says why."""


class Failed(Exception):
    """The step ran and failed; ``lines`` are the last lines of what failed."""

    def __init__(self, message: str, lines: str = "") -> None:
        super().__init__(message)
        self.lines = lines


@dataclass
class Check:
    device: torch.device
    tiny: bool
    out: str
    work: str
    env: dict[str, str]
    details: dict[str, Any] = field(default_factory=dict)  # the running step's

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def run(
        self,
        name: str,
        cmd: list[str],
        expect: int = 0,
        env: dict[str, str] | None = None,
        timeout: int = RUN_TIMEOUT,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the work folder, its output into logs/<name>.log; Failed with its last
        lines unless it exits with ``expect``."""
        log = os.path.join(self.work, "logs", f"{name}.log")
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.work,
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise Failed(f"{name}: no end after {timeout} s", _tail(_text(e.stderr))) from None
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        if proc.returncode != expect:
            raise Failed(
                f"{name}: exit status {proc.returncode} (expected {expect}); log {log}",
                _tail(proc.stdout + proc.stderr),
            )
        return proc

    def call(self, name: str, main: Callable[[list[str]], int], argv: list[str]) -> str:
        """``main(argv)`` of one of the scripts, in this process (an interpreter start is
        seconds at these sizes), from the work folder; its stdout and stderr into
        logs/<name>.log. Returns its stdout; Failed with its last lines unless it returns 0."""
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.work)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        finally:
            os.chdir(cwd)
        log = os.path.join(self.work, "logs", f"{name}.log")
        with open(log, "w") as f:
            f.write(f"main({argv})\n{out.getvalue()}\n--- stderr ---\n{err.getvalue()}")
        if code != 0:
            text = out.getvalue() + err.getvalue()
            raise Failed(f"{name}: returned {code}; log {log}", _tail(text))
        return out.getvalue()

    def script(self, path: str) -> list[str]:
        return [sys.executable, os.path.join(ROOT, path)]


def _nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()  # a tuple (an int in older PyTorch)
    except Exception as e:  # a build without NCCL
        return f"none ({type(e).__name__})"
    return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def _text(b: Any) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _tail(text: str, n: int = LAST_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# --------------------------------------------------------------------------------------------
# 1. Versions
# --------------------------------------------------------------------------------------------
def versions(c: Check) -> str:
    d = c.details
    d.update(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        platform=platform.platform(),
        cpus=os.cpu_count(),
        tf32_at_start=TF32_AT_START,
        device=str(c.device),
    )
    if c.cuda:
        i = c.device.index or 0
        props = torch.cuda.get_device_properties(i)
        d.update(
            cudnn=torch.backends.cudnn.version(),
            nccl=_nccl_version(),
            gpu=torch.cuda.get_device_name(i),
            compute_capability=".".join(str(v) for v in torch.cuda.get_device_capability(i)),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus_visible=torch.cuda.device_count(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        return f"{d['gpu']} (sm {d['compute_capability']}), CUDA {d['cuda']}, cuDNN {d['cudnn']}"
    return f"CPU only: PyTorch {torch.__version__}, {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------------------------
# 2. The second-order alpha gradient against float64 on the CPU
# --------------------------------------------------------------------------------------------
def alpha_gradient(c: Check) -> str:
    import architect as architect_module
    from architect import Architect
    from models.search_cnn import SearchCNNController

    C, layers, nodes, batch, side = (4, 3, 2, 4, 8) if c.tiny else (8, 5, 4, 64, 16)
    torch.manual_seed(0)
    base = SearchCNNController(3, C, 10, layers, nn.CrossEntropyLoss(), n_nodes=nodes)
    data = [(torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))) for _ in "tv"]
    xi = 0.025  # search.py's first-epoch learning rate

    def grad(
        device: torch.device, dtype: torch.dtype, hessian: str, tf32: bool, in_hvp: bool
    ) -> torch.Tensor:
        """The alpha gradient of one second-order step, flattened, float64 on the CPU."""
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
        w_optim = torch.optim.SGD(model.weights(), xi, momentum=0.9, weight_decay=3e-4)
        arch = Architect(model, 0.9, 3e-4, hessian=hessian)
        (tX, ty), (vX, vy) = [(X.to(device, dtype), y.to(device)) for X, y in data]
        saved = architect_module.tf32_disabled
        distributed.set_tf32(tf32)
        if in_hvp:  # what the context keeps out: TF32 inside the product too
            architect_module.tf32_disabled = contextlib.nullcontext  # type: ignore[assignment]
        try:
            arch.unrolled_backward(tX, ty, vX, vy, xi, w_optim)
        finally:
            architect_module.tf32_disabled = saved
            distributed.set_tf32(False)
        grads = [a.grad for a in model.alphas()]
        assert all(g is not None for g in grads), "an alpha got no gradient"
        return torch.cat([g.flatten() for g in grads if g is not None]).double().cpu()

    cpu, f32, f64 = torch.device("cpu"), torch.float32, torch.float64
    rows = [("cpu float32", cpu, f32, False, False)]
    if c.cuda:
        rows += [
            (f"{c.device} float64", c.device, f64, False, False),
            (f"{c.device} float32, TF32 off", c.device, f32, False, False),
            (f"{c.device} float32, --allow_tf32 (not in the product)", c.device, f32, True, False),
            (f"{c.device} float32, TF32 in the product too (record)", c.device, f32, True, True),
        ]
    table, verdicts = [], []
    for hessian in ("finite", "exact"):
        ref = grad(cpu, f64, hessian, False, False)
        errors = {}
        for label, device, dtype, tf32, in_hvp in rows:
            g = grad(device, dtype, hessian, tf32, in_hvp)
            rel = float((g - ref).norm() / ref.norm())
            cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
            errors[label] = rel
            table.append({"hessian": hessian, "run": label, "rel_error": rel, "cosine": cos})
        tol = max(CPU_FP32_FACTOR * errors["cpu float32"], FLOOR)
        if c.cuda:
            err32 = errors[f"{c.device} float32, TF32 off"]
            err64 = errors[f"{c.device} float64"]
            verdicts.append((hessian, err32 <= tol and err64 <= FP64_TOL, err32, tol, err64))
        else:
            verdicts.append((hessian, True, errors["cpu float32"], tol, 0.0))
    c.details.update(
        network=f"C={C}, {layers} layers, {nodes} nodes, batch {batch} of 3x{side}x{side}",
        tolerance=(
            f"device float32 (TF32 off) within max({CPU_FP32_FACTOR:g} x the CPU float32 error, "
            f"{FLOOR:g}); device float64 within {FP64_TOL:g}; relative L2 error against CPU "
            f"float64"
        ),
        rows=table,
    )
    bad = [v for v in verdicts if not v[1]]
    if bad:
        h, _, err32, tol, err64 = bad[0]
        raise Failed(
            f"{h}: float32 error {err32:.2e} (tolerance {tol:.2e}), float64 error {err64:.2e}"
        )
    if not c.cuda:
        return "CPU float32 against float64 only (no CUDA here): " + ", ".join(
            f"{v[0]} {v[2]:.2e}" for v in verdicts
        )
    return ", ".join(f"{v[0]}: float32 {v[2]:.2e} (tol {v[3]:.2e})" for v in verdicts)


# --------------------------------------------------------------------------------------------
# 3. A search stopped by SIGTERM and resumed
# --------------------------------------------------------------------------------------------
def search_args(c: Check, name: str) -> list[str]:
    size = (
        "--layers 3 --init_channels 4 --nodes 2 --batch_size 128 --workers 0 --first_order"
        if c.tiny
        else "--layers 5 --init_channels 8 --batch_size 32 --workers 2"
    )
    return ["--name", name, "--dataset", "digits", "--epochs", "2", *size.split()]


def _device_flag(c: Check) -> list[str]:
    return ["--device", "cpu" if not c.cuda else str(c.device)]


def search_resume(c: Check) -> str:
    search = c.script("search.py")
    cmd = [*search, *search_args(c, "stopped"), *_device_flag(c)]
    # The uninterrupted run alongside (one thread each on a CPU): the two do not interact.
    whole_log = os.path.join(c.work, "logs", "search-uninterrupted.log")
    with open(whole_log, "w") as log:
        whole = subprocess.Popen(
            [*search, *search_args(c, "whole"), *_device_flag(c)],
            cwd=c.work,
            env=c.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stopped = subprocess.Popen(
        cmd, cwd=c.work, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = _stop_after_first_epoch(c, stopped)
        code = whole.wait(timeout=RUN_TIMEOUT)
    finally:
        for proc in (whole, stopped):  # whatever went wrong, no run is left behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if stopped.returncode != 128 + signal.SIGTERM or "interrupted by SIGTERM" not in err:
        raise Failed(f"SIGTERM: exit status {stopped.returncode}, not 143", _tail(out + err))
    if code != 0:
        raise Failed(f"the uninterrupted run: exit status {code}", _tail(open(whole_log).read()))
    stopped_at = _load(c, "searchs", "stopped")["epoch"]

    import search as search_module  # the resumed run in this process: the same main(argv)

    c.call("search-resumed", search_module.main, [*cmd[2:], "--resume"])
    reference, resumed = _load(c, "searchs", "whole"), _load(c, "searchs", "stopped")
    cmp = compare_runs(reference, resumed)
    c.details.update(stopped_after_epoch=stopped_at, **cmp)
    if stopped_at != 1 or resumed["epoch"] != 2:
        raise Failed(f"stopped after epoch {stopped_at}, resumed run ended at {resumed['epoch']}")
    if cmp["bit_exact"]:
        return "stopped after epoch 1, resumed: bit for bit the uninterrupted run"
    # Not bit for bit: expected on CUDA only. cudnn.benchmark chooses the convolution
    # algorithms anew in each process, and some backward algorithms add with atomics, so the
    # last bits of the gradients vary from process to process (uninterrupted runs too).
    c.details["note"] = (
        "not bit for bit: on CUDA each process chooses its cuDNN algorithms (cudnn.benchmark) "
        "and some backward kernels add with atomics, so the last bits vary between processes"
    )
    if not c.cuda:
        raise Failed("on the CPU the resumed run must equal the uninterrupted one bit for bit")
    if cmp["max_alpha_diff"] > 1e-4 or cmp["max_metric_rel_diff"] > 1e-3:
        raise Failed(
            f"resumed run differs beyond nondeterminism: alphas by {cmp['max_alpha_diff']:.2e}, "
            f"metrics by {cmp['max_metric_rel_diff']:.2e} (relative)"
        )
    same = "same genotype" if cmp["genotype_equal"] else "genotypes differ (near-tied alphas)"
    return (
        f"resumed after epoch 1; alphas within {cmp['max_alpha_diff']:.1e}, metrics within "
        f"{cmp['max_metric_rel_diff']:.1e} relative, {same} (not bit for bit: cuDNN)"
    )


def _stop_after_first_epoch(c: Check, proc: subprocess.Popen) -> tuple[str, str]:
    """Wait until the run's log says epoch 1 is done (its checkpoint written), then SIGTERM it
    while epoch 2 runs; its stdout and stderr."""
    log = os.path.join(c.work, "searchs", "stopped", "search.log")
    deadline = time.time() + RUN_TIMEOUT
    while proc.poll() is None:
        if os.path.exists(log) and "Epoch 1 done" in open(log).read():
            break
        if time.time() > deadline:
            raise Failed(f"epoch 1 did not end in {RUN_TIMEOUT} s")
        time.sleep(0.02)
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise Failed("the run ended before it could be interrupted", _tail(out + err))
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=RUN_TIMEOUT)


def _load(c: Check, root: str, name: str) -> dict[str, Any]:
    path = os.path.join(c.work, root, name, "checkpoint.pth.tar")
    return torch.load(path, map_location="cpu", weights_only=True)


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How far two search checkpoints are apart: their alphas, their per-epoch numbers and
    genotypes (the history, without the wall times)."""
    alphas = [k for k in a["model"] if "alpha" in k]
    alpha_diff = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in alphas)
    weights_equal = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metric_diff, genotypes_equal, history_equal = 0.0, True, True
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k, va in ha.items():
            if k == "time":
                continue
            vb = hb.get(k)
            history_equal &= va == vb
            if isinstance(va, float) and isinstance(vb, float):
                metric_diff = max(metric_diff, abs(va - vb) / max(abs(va), 1e-12))
        genotypes_equal &= ha.get("genotype") == hb.get("genotype")
    return {
        "bit_exact": weights_equal and history_equal,
        "max_alpha_diff": alpha_diff,
        "max_metric_rel_diff": metric_diff,
        "genotype_equal": genotypes_equal,
        "final_genotype": b["history"][-1].get("genotype"),
    }


# --------------------------------------------------------------------------------------------
# 4. Augment in float32, bfloat16 and float16, then evaluate.py
# --------------------------------------------------------------------------------------------
def augment_amp(c: Check) -> str:
    import augment
    import evaluate

    size = (
        "--layers 3 --init_channels 4 --batch_size 128 --workers 0"
        if c.tiny
        else "--layers 8 --init_channels 16 --batch_size 96 --workers 2"
    )
    runs, notes = {}, []
    for amp in ("none", "bf16", "fp16"):
        if amp == "fp16" and not c.cuda:
            notes.append("fp16 skipped: float16 autocast and its gradient scaler need CUDA")
            continue
        name = f"amp-{amp}"
        args = ["--name", name, "--dataset", "digits", "--genotype", "DARTS_V2", "--epochs", "1"]
        args += [*size.split(), "--cutout_length", "4", "--amp", amp, *_device_flag(c)]
        c.call(f"augment-{amp}", augment.main, args)
        state = _load(c, "augments", name)
        if amp == "fp16" and "scale" not in state.get("scaler", {}):
            raise Failed("--amp fp16: the checkpoint holds no gradient scaler state")
        metrics = state["history"][-1]
        checkpoint = os.path.join("augments", name, "checkpoint.pth.tar")
        ev_argv = ["--checkpoint", checkpoint, "--amp", amp, "--workers", "0", *_device_flag(c)]
        printed = c.call(f"evaluate-{amp}", evaluate.main, ev_argv)
        m = re.search(r"Test loss (\S+) top1 (\S+)%", printed)
        if not m:
            raise Failed(f"evaluate.py --amp {amp}: no result line", _tail(printed))
        got_loss, got_top1 = float(m.group(1)), float(m.group(2)) / 100
        runs[amp] = {
            "train_loss": metrics["train_loss"],
            "test_top1": metrics["test_top1"],
            "test_loss": metrics["test_loss"],
            "evaluate_top1": got_top1,
            "evaluate_loss": got_loss,
            "scaler_saved": "scaler" in state,
        }
        # evaluate.py prints the loss to 4 decimals and the top-1 to 2 (of a percent); on CUDA
        # each process may pick other cuDNN algorithms, so one image more or less may flip.
        n = metrics["test_count"]
        slack = 1.0 / n if c.cuda else 0.0
        if abs(got_top1 - metrics["test_top1"]) > slack + 6e-5:  # printed: 0.01% steps
            raise Failed(
                f"--amp {amp}: evaluate.py top1 {got_top1:.2%}, augment.py logged "
                f"{metrics['test_top1']:.2%}"
            )
    c.details.update(runs=runs, notes=notes)
    return f"{', '.join(runs)}: trained, checkpointed, evaluate.py agrees" + (
        f"; {notes[0]}" if notes else ""
    )


# --------------------------------------------------------------------------------------------
# 5. The authors' weights on the device
# --------------------------------------------------------------------------------------------
def official_fixture(c: Check) -> str:
    import genotypes as gt
    import official
    from models.augment_cnn import AugmentCNN

    folder = os.path.join(ROOT, "tests", "fixtures", "official")
    if not os.path.isdir(folder):
        raise Skip(f"no {folder} here (the Docker image copies no tests/)")
    cases = {
        "cifar_darts_v2_c8_l5_aux.pt": (False, 32),
        "imagenet_darts_v2_c8_l5_aux.pth.tar": (True, 224),
    }
    tol = FIXTURE_TOL[c.device.type]
    rows: list[dict[str, Any]] = []
    for name, (imagenet, side) in cases.items():
        expected_name = name.split(".")[0] + ".expected.pt"
        want = torch.load(os.path.join(folder, expected_name), weights_only=True)
        model = AugmentCNN(side, 3, 8, 10, 5, True, gt.DARTS_V2, imagenet=imagenet)
        official.load(model, official.read_weights(os.path.join(folder, name)), "DARTS_V2")
        model.to(c.device).to(memory_format=torch.channels_last).eval()
        x = want["x"].to(c.device)
        settings: list[tuple[str, bool, torch.dtype | None]] = [("float32, TF32 off", False, None)]
        if c.cuda:
            settings += [("float32, TF32 on (record)", True, None)]
            settings += [("bfloat16 autocast (record)", False, torch.bfloat16)]
        for label, tf32, amp in settings:
            distributed.set_tf32(tf32)
            try:
                with torch.no_grad(), torch.autocast(c.device.type, amp, enabled=amp is not None):
                    got = model(x)[0].float().cpu()
            finally:
                distributed.set_tf32(False)
            rel = float((got - want["logits"]).abs().max() / want["logits"].abs().max())
            rows.append({"fixture": name, "run": label, "rel_error": rel})
    tolerance = f"max abs(got - want) / max abs(want) <= {tol:g}, TF32 off"
    c.details.update(rows=rows, tolerance=tolerance)
    worst = max(r["rel_error"] for r in rows if r["run"] == "float32, TF32 off")
    if worst > tol:
        raise Failed(f"the authors' logits differ by {worst:.2e} (tolerance {tol:g})")
    return f"CIFAR and ImageNet fixtures on {c.device}: max relative error {worst:.1e}"


# --------------------------------------------------------------------------------------------
# 6. scripts/benchmark.py
# --------------------------------------------------------------------------------------------
def benchmark(c: Check) -> str:
    bench = c.script(os.path.join("scripts", "benchmark.py"))
    figures = "weight,second_order,augment"
    combos: list[tuple[str, str]] = []
    if c.tiny:  # tiny shapes, one step of one figure: that the code runs, no measurement
        shape = "--batch 2 --channels 4 --layers 3 --size 16 --steps 1 --warmup 0".split()
    else:  # the paper's: batch 64, C=16, 8 layers (search); batch 96, C=36, 20 layers (augment)
        shape = []
        combos = [(d, m) for d in ("float32", "bfloat16") for m in ("channels_last", "contiguous")]
    results = []
    for dtype, fmt in combos:
        proc = c.run(
            f"benchmark-{dtype}-{fmt}",
            [*bench, "--device", str(c.device), "--figures", figures, "--dtype", dtype]
            + ["--memory_format", fmt, "--json", *shape],
        )
        results += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # The per-op profile of the second-order step, one more process (tiny: of the weight step,
    # whose profile costs seconds where the second-order step's costs most of a minute on a
    # CPU; its --json line is then the tiny run's one figure).
    profiled = "weight" if c.tiny else "second_order"
    proc = c.run(
        "benchmark-profile",
        [*bench, "--device", str(c.device), "--only", profiled, "--profile", "--json", *shape],
    )
    if c.tiny:
        results += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    table = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("USDT:", "ERROR:"))]
    c.details[f"profile_{profiled}"] = _tail("\n".join(table), 40)
    keep = ("figure", "seconds", "peak_memory_bytes", "memory", "dtype", "memory_format")
    c.details["results"] = [
        {k: r[k] for k in keep} | {"shape": f"{r['input']}, C={r['channels']}, {r['layers']} L"}
        for r in results
    ]
    if results:
        c.details["conditions"] = (
            f"{results[0]['device']}, PyTorch {results[0]['torch']}, median of "
            f"{results[0]['steps']} steps after {results[0]['warmup']} warm-up"
        )
    want = len(combos) * len(figures.split(",")) if combos else 1
    if len(results) != want:
        raise Failed(f"{len(results)} figures measured, {want} expected", _tail(proc.stdout))
    if c.tiny:
        return "the weight step and its profile at tiny shapes: a run of the code, no figure"
    return f"{len(results)} figures and the second-order step's profile"


# --------------------------------------------------------------------------------------------
# 7. DDP
# --------------------------------------------------------------------------------------------
def ddp(c: Check) -> str:
    if not torch.distributed.is_available():
        raise Skip("this PyTorch build has no torch.distributed")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    size = (
        "--layers 3 --init_channels 4 --nodes 2 --batch_size 64 --workers 0 --first_order"
        if c.tiny
        else "--layers 5 --init_channels 8 --batch_size 32 --workers 2"
    )
    common = ["--dataset", "digits", "--epochs", "1", *size.split()]
    search = os.path.join(ROOT, "search.py")
    runs = {}
    if c.cuda:  # one process: torchrun's launch with --gpus at its default, GPU 0
        c.run("ddp-1", [*torchrun, "--nproc_per_node=1", search, "--name", "ddp1", *common])
        runs["torchrun, 1 process"] = "finished"
    # two processes on one GPU (or two CPU processes): gloo, as NCCL takes one process per GPU
    two = ["--gpus", "0,0"] if c.cuda else ["--device", "cpu"]
    env = {"DARTS_DIST_BACKEND": "gloo"} if c.cuda else {}
    c.run(
        "ddp-2", [*torchrun, "--nproc_per_node=2", search, "--name", "ddp2", *common, *two], env=env
    )
    log = open(os.path.join(c.work, "searchs", "ddp2", "search.log")).read()
    if "DDP: weights, alphas and BN statistics are identical on the 2 processes" not in log:
        raise Failed("the two processes' replicas are not reported identical", _tail(log))
    runs["torchrun, 2 processes, gloo"] = "finished, replicas identical"
    for name in ("ddp1", "ddp2") if c.cuda else ("ddp2",):
        if not os.path.exists(os.path.join(c.work, "searchs", name, "genotype.txt")):
            raise Failed(f"searchs/{name}: no genotype.txt")
    c.details["runs"] = runs
    if not c.cuda:
        return "torchrun with 2 CPU processes (gloo): finished, replicas identical"
    return f"torchrun with 1 process and with 2 on {c.device} (gloo): both finished"


# --------------------------------------------------------------------------------------------
# 8. The protocol
# --------------------------------------------------------------------------------------------
def protocol(c: Check) -> str:
    if c.tiny:
        counts = "--searches 1 --select_epochs 1 --final_runs 1".split()
        s_args = "--epochs 1 --layers 3 --init_channels 4 --nodes 2 --batch_size 128 --workers 0"
        s_args += " --first_order"
        a_args = "--layers 3 --init_channels 4 --batch_size 128 --workers 0 --cutout_length 4"
        a_args += " --epochs 1"
    else:  # the tiny protocol of docs/protocol.md
        counts = "--searches 2 --select_epochs 2 --final_runs 2".split()
        s_args = "--epochs 2 --layers 5 --init_channels 8"
        a_args = "--layers 6 --init_channels 16 --epochs 3 --cutout_length 4"
    c.run(
        "protocol",
        [*c.script(os.path.join("scripts", "protocol.py")), "--name", "gc", "--dataset", "digits"]
        + [*counts, "--search_args", s_args, "--augment_args", a_args, "--gpus", "0"],
    )
    with open(os.path.join(c.work, "protocols", "gc", "report.json")) as f:
        report = json.load(f)
    c.details["report"] = {k: v for k, v in report.items() if k in ("picked", "summary", "final")}
    return f"protocols/gc: report written ({', '.join(sorted(report))[:80]})"


# --------------------------------------------------------------------------------------------
# Running the steps and writing the report
# --------------------------------------------------------------------------------------------
STEP_FUNCTIONS: dict[str, Callable[[Check], str]] = {
    "versions": versions,
    "alpha_gradient": alpha_gradient,
    "search_resume": search_resume,
    "augment_amp": augment_amp,
    "official_fixture": official_fixture,
    "benchmark": benchmark,
    "ddp": ddp,
    "protocol": protocol,
}
TF32_AT_START = distributed.tf32_flags()


def run_step(c: Check, name: str) -> dict[str, Any]:
    c.details = {}
    t0 = time.time()
    record: dict[str, Any] = {"step": name}
    try:
        record.update(status="passed", summary=STEP_FUNCTIONS[name](c))
    except Skip as e:
        record.update(status="skipped", reason=str(e))
    except Failed as e:
        record.update(status="failed", summary=str(e), last_lines=e.lines)
    except Exception as e:  # a step's own bug is a failed step, not the end of the check
        record.update(
            status="failed",
            summary=f"{type(e).__name__}: {e}".splitlines()[0][:300],
            last_lines=_tail(traceback.format_exc()),
        )
    record["seconds"] = round(time.time() - t0, 1)
    record["details"] = c.details
    return record


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# GPU check",
        "",
        f"`{report['command']}` at commit {report['commit']}, {report['started']}, "
        f"{report['total_seconds']:.0f} s in all, on {report['device']}"
        + (" (tiny sizes)" if report["tiny"] else ""),
        "",
        "| step | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    for s in report["steps"]:
        text = s.get("summary") or s.get("reason", "")
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {text} |")
    for s in report["steps"]:
        lines += ["", f"## {s['step']}: {s['status']}", ""]
        if s["status"] == "skipped":
            lines.append(f"Skipped: {s['reason']}")
        if s.get("last_lines"):
            lines += ["Last lines:", "", "```", s["last_lines"], "```", ""]
        for key, value in s["details"].items():
            if (
                isinstance(value, dict)
                and value
                and all(isinstance(v, dict) for v in value.values())
            ):
                value = [{"": k, **v} for k, v in value.items()]  # one row per key
            if isinstance(value, list) and value and isinstance(value[0], dict):
                cols = list(value[0])
                lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_cell(r.get(k)) for k in cols) + " |" for r in value]
                lines.append("")
            elif isinstance(value, str) and "\n" in value:
                lines += [f"{key}:", "", "```", value, "```", ""]
            else:
                lines.append(f"- {key}: {_cell(value)}")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU (about 2 minutes)")
    p.add_argument("--out", default="gpu_check", help="folder of report.md and report.json")
    p.add_argument("--only", default=",".join(STEPS), help="comma list of the steps to run")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STEPS]
    problem = f"unknown step(s) {', '.join(unknown)} (steps: {', '.join(STEPS)})" if unknown else ""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = torch.device("meta")  # refused below
    if not problem and device.type not in ("cuda", "cpu"):
        problem = f"--device must be cuda, cuda:N or cpu, got {args.device!r}"
    elif not problem and device.type == "cuda" and not torch.cuda.is_available():
        problem = "no CUDA GPU is visible: run with --device cpu --tiny for the CPU steps"
    if problem:
        print(f"gpu_check.py: error: {problem}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    shutil.rmtree(work, ignore_errors=True)  # this script's own runs of an earlier check
    os.makedirs(os.path.join(work, "logs"))
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if device.type == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # several processes share the cores
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # and so do the runs made here
    c = Check(device, args.tiny, out, work, env)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    steps = []
    for name in (s for s in STEPS if s in only):
        print(f"gpu_check: {name} ...", flush=True)
        steps.append(run_step(c, name))
        s = steps[-1]
        print(
            f"gpu_check: {name}: {s['status']} in {s['seconds']:.1f} s: "
            f"{s.get('summary') or s.get('reason', '')}",
            flush=True,
        )
    report = {
        "command": "python scripts/gpu_check.py " + " ".join(argv),
        "commit": _git_commit(),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "tiny": args.tiny,
        "total_seconds": round(time.time() - t0, 1),
        "steps": steps,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    print(
        f"gpu_check: {len(steps) - len(failed)} of {len(steps)} steps passed or skipped"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; report in {os.path.join(out, 'report.md')}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
