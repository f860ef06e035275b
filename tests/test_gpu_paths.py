"""What the first GPU run would meet, tested on the CPU with CUDA mocked: the device each
torchrun process takes, the CUDA RNG state of a checkpoint resumed on fewer GPUs, TF32 kept out
of the Hessian-vector product, the environment of the --gpus self-launch, and the drop path's
rescaling in bfloat16."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from conftest import load_script

import checkpoint
import distributed
from architect import Architect
from config import AugmentConfig, SearchConfig
from models.augment_cnn import drop_path
from models.search_cnn import SearchCNNController
from utils import ConfigError


# ------------------------------------------------------------------- mocked CUDA machines
class FakeCuda:
    """``n`` visible GPUs, as far as distributed.py and checkpoint.py ask: the count, the
    current device, and one RNG state per device (a real set_rng_state on a device that is not
    visible raises IndexError, as torch.cuda's does)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, n: int, current: int = 0, used: bool = True
    ) -> None:
        self.n, self.current = n, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(n)}
        self.set_devices: list[torch.device] = []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: used)  # this process used CUDA
        monkeypatch.setattr(cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "set_device", self.set_device)
        monkeypatch.setattr(cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(
            cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(self.n)]
        )

    def _index(self, device: int | str | torch.device) -> int:
        if isinstance(device, int):
            return device
        d = torch.device(device)
        return self.current if d.index is None else d.index

    def set_device(self, device: torch.device) -> None:
        self.set_devices.append(device)
        self.current = self._index(device)

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        i = self._index(device)
        if i >= self.n:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[i]
        self.states[i] = state.clone()


def torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    for key, value in dict(
        RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world
    ).items():
        monkeypatch.setenv(key, str(value))
    # the process group is torchrun's business; here it counts as joined
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)


# --------------------------------------------------------------- torchrun: rank r, GPU r
@pytest.mark.parametrize("rank", range(4))
def test_torchrun_with_default_gpus_gives_local_rank_r_gpu_r(rank, monkeypatch):
    """`torchrun --nproc_per_node=4 search.py ...` (--gpus left at its default 0)."""
    fake = FakeCuda(monkeypatch, n=4)
    torchrun_env(monkeypatch, rank, 4)
    gpus = SearchConfig(name="x", dataset="digits").gpu_ids()  # the default
    info, device = distributed.init_distributed("auto", gpus)
    assert (info.rank, info.world_size, info.local_rank) == (rank, 4, rank)
    assert device == torch.device("cuda", rank)
    assert fake.set_devices == [device]  # the process's current device, for NCCL and the RNG


def test_torchrun_with_listed_gpus_maps_rank_r_to_the_r_th(monkeypatch):
    fake = FakeCuda(monkeypatch, n=4)
    torchrun_env(monkeypatch, 1, 2)
    _, device = distributed.init_distributed("auto", distributed.parse_gpus("3,2"))
    assert device == torch.device("cuda", 2) and fake.set_devices == [device]


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    FakeCuda(monkeypatch, n=2)
    torchrun_env(monkeypatch, 3, 4)
    with pytest.raises(ConfigError, match="^4 processes on this node but 2 GPUs are visible"):
        distributed.init_distributed("auto", [0])
    with pytest.raises(ConfigError, match="^4 processes on this node but --gpus lists 2"):
        distributed.init_distributed("auto", [1, 0])


def test_one_process_makes_its_gpu_the_current_device(monkeypatch):
    """--gpus 3 without torchrun: cuda:3 becomes current, so its RNG state is the one saved."""
    fake = FakeCuda(monkeypatch, n=4)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    _, device = distributed.init_distributed("auto", [3])
    assert device == torch.device("cuda", 3) and fake.current == 3


# ------------------------------------------------------------ resume on fewer visible GPUs
def saved_rng(tmp_path, cuda_state) -> dict:
    """An RNG state as a checkpoint holds it, its "cuda" entry replaced, through a real file
    (loaded with weights_only=True)."""
    state = checkpoint.rng_state(torch.Generator().manual_seed(0))
    state["cuda"] = cuda_state
    path = str(tmp_path / "ckpt.pth.tar")
    checkpoint.save_checkpoint({"model": {}, "config": {}, "rng": state}, path)
    return checkpoint.load_checkpoint(path)["rng"]


def test_a_checkpoint_of_four_gpus_resumes_on_one(tmp_path, monkeypatch):
    """Older checkpoints hold every visible GPU's state (get_rng_state_all); resumed with one
    GPU visible, the state of this process's device index is restored, and nothing else."""
    four = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(4)]
    rng = saved_rng(tmp_path, four)
    fake = FakeCuda(monkeypatch, n=1)
    checkpoint.set_rng_state(rng, torch.Generator())
    assert torch.equal(fake.states[0], four[0])
    # a process on GPU 2 of 3 takes state 2; on a GPU the list lacks, the first one
    for n, current, want in ((3, 2, 2), (8, 5, 0)):
        fake = FakeCuda(monkeypatch, n=n, current=current)
        checkpoint.set_rng_state(rng, torch.Generator())
        assert torch.equal(fake.states[current], four[want])


def test_the_checkpoint_keeps_this_process_gpu_state_only(tmp_path, monkeypatch):
    """Saved by the process on GPU 2 of 4, restored by one on GPU 0 of 1 (another machine, or
    CUDA_VISIBLE_DEVICES): the state travels to this process's device."""
    writer = FakeCuda(monkeypatch, n=4, current=2)
    state = checkpoint.rng_state(torch.Generator())
    assert isinstance(state["cuda"], torch.Tensor)  # one state, not a list of four
    assert torch.equal(state["cuda"], writer.states[2])
    rng = saved_rng(tmp_path, state["cuda"])
    reader = FakeCuda(monkeypatch, n=1)
    checkpoint.set_rng_state(rng, torch.Generator())
    assert torch.equal(reader.states[0], writer.states[2])


def test_a_cpu_run_on_a_gpu_machine_saves_no_cuda_state(monkeypatch):
    """Asking for a CUDA RNG state would start a CUDA context the run does not use."""
    FakeCuda(monkeypatch, n=2, used=False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: pytest.fail("CUDA touched"))
    assert checkpoint.rng_state(torch.Generator())["cuda"] is None


def test_a_checkpoint_written_without_cuda_resumes_on_a_gpu(tmp_path, monkeypatch):
    for none in (None, []):
        rng = saved_rng(tmp_path, none)
        fake = FakeCuda(monkeypatch, n=1)
        before = fake.states[0].clone()
        checkpoint.set_rng_state(rng, torch.Generator())
        assert torch.equal(fake.states[0], before)


# ------------------------------------------------------------------------------- TF32
def test_tf32_disabled_switches_both_flags_off_and_restores_them(monkeypatch):
    distributed.set_tf32(True)
    try:
        assert distributed.tf32_flags() == {"cudnn_conv": True, "cuda_matmul": True}
        with distributed.tf32_disabled():
            assert distributed.tf32_flags() == {"cudnn_conv": False, "cuda_matmul": False}
        assert distributed.tf32_flags() == {"cudnn_conv": True, "cuda_matmul": True}
        with pytest.raises(RuntimeError, match="boom"), distributed.tf32_disabled():
            raise RuntimeError("boom")
        assert distributed.tf32_flags() == {"cudnn_conv": True, "cuda_matmul": True}
        distributed.set_tf32(False)
        assert distributed.tf32_flags() == {"cudnn_conv": False, "cuda_matmul": False}
        assert "TF32: off for cuDNN convolutions, off for CUDA matmuls" in (
            distributed.tf32_summary()
        )
    finally:
        distributed.set_tf32(False)


def tiny_search_step(hessian: str) -> tuple[Architect, tuple, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = SearchCNNController(1, 4, 10, 3, nn.CrossEntropyLoss(), n_nodes=2)
    w_optim = torch.optim.SGD(net.weights(), 0.025, momentum=0.9)
    batch = lambda: (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))  # noqa: E731
    return Architect(net, 0.9, 3e-4, hessian=hessian), (*batch(), *batch()), w_optim


@pytest.mark.parametrize("hessian", ["finite", "exact"])
def test_the_hessian_vector_product_runs_without_tf32(hessian, monkeypatch):
    """TF32 allowed by the user (--allow_tf32): off inside the Hessian-vector product, on again
    after it, also when it fails; the rest of the step keeps the user's setting."""
    architect, batches, w_optim = tiny_search_step(hessian)
    name = "_exact_hessian_vector_product" if hessian == "exact" else "_hessian_vector_product"
    original = getattr(Architect, name)
    seen, fail = [], []

    def spy(self, *args):
        seen.append(distributed.tf32_flags())
        if fail:
            raise RuntimeError("failed in the product")
        return original(self, *args)

    monkeypatch.setattr(Architect, name, spy)
    virtual = Architect._virtual_gradients

    def spy_virtual(self, *args):
        seen.append(distributed.tf32_flags())
        return virtual(self, *args)

    monkeypatch.setattr(Architect, "_virtual_gradients", spy_virtual)
    on, off = {"cudnn_conv": True, "cuda_matmul": True}, {"cudnn_conv": False, "cuda_matmul": False}
    distributed.set_tf32(True)
    try:
        architect.unrolled_backward(*batches, 0.025, w_optim)
        assert seen == [on, off]  # virtual step with the user's TF32, the product without
        assert distributed.tf32_flags() == on
        fail.append(True)
        with pytest.raises(RuntimeError, match="failed in the product"):
            architect.unrolled_backward(*batches, 0.025, w_optim)
        assert distributed.tf32_flags() == on
    finally:
        distributed.set_tf32(False)


def test_the_hypergradient_check_runs_without_tf32(monkeypatch, capsys):
    module = load_script("scripts/hessian_check.py")
    seen = []
    for name in ("_hessian_vector_product", "_exact_hessian_vector_product"):
        original = getattr(Architect, name)

        def spy(self, *args, _original=original):
            seen.append(distributed.tf32_flags())
            return _original(self, *args)

        monkeypatch.setattr(Architect, name, spy)
    distributed.set_tf32(True)
    try:
        argv = ["--batch", "2", "--channels", "4", "--layers", "3", "--scales", "0.01"]
        assert module.main(argv) == 0
        assert seen and all(f == {"cudnn_conv": False, "cuda_matmul": False} for f in seen)
        assert distributed.tf32_flags() == {"cudnn_conv": True, "cuda_matmul": True}
    finally:
        distributed.set_tf32(False)
    assert "cosine(finite, exact)" in capsys.readouterr().out


def test_allow_tf32_is_a_flag_of_both_stages_and_may_change_on_resume():
    base = ["--name", "x", "--dataset", "digits"]
    assert not SearchConfig.from_argv(base).allow_tf32
    assert SearchConfig.from_argv([*base, "--allow_tf32"]).allow_tf32
    assert AugmentConfig.from_argv([*base, "--genotype", "DARTS_V2", "--allow_tf32"]).allow_tf32
    saved = SearchConfig(name="x", dataset="digits").to_dict()
    wanted = {**saved, "allow_tf32": True}
    assert checkpoint.changed_setting(saved, wanted, checkpoint.RESUMABLE_CHANGES) is None
    old = {k: v for k, v in saved.items() if k != "allow_tf32"}  # a run from before the flag
    assert checkpoint.changed_setting(old, saved, (), saved) is None


# --------------------------------------------------------------- the --gpus self-launch
@pytest.mark.parametrize("given", [None, "3"])
def test_self_launch_gives_each_process_one_omp_thread_unless_set(given, monkeypatch):
    """As torchrun does: OMP_NUM_THREADS=1 in the processes when the user set none; theirs
    when set. The launcher's environment is this process's, read when it starts them."""
    import torch.distributed.launcher.api as launcher

    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    started = []

    def fake_elastic_launch(config, entrypoint):
        def launch(*args):
            started.append((config.nproc_per_node, dict(os.environ), args))

        return launch

    monkeypatch.setattr(launcher, "elastic_launch", fake_elastic_launch)
    assert distributed.self_launch("search.py", ["--name", "x"], "cpu", [0, 1])
    ((n, env, args),) = started
    assert n == 2 and args[1:] == ("--name", "x")
    assert env["OMP_NUM_THREADS"] == (given or "1")
    assert env[distributed.SELF_LAUNCHED] == "1"
    assert os.environ.get("OMP_NUM_THREADS") == given  # this process's own is left as it was
    assert distributed.SELF_LAUNCHED not in os.environ


# ------------------------------------------------------------------ drop path in bf16
@pytest.mark.parametrize("p", [0.003, 0.01])
def test_drop_path_rescales_in_bfloat16_at_small_drop_probabilities(p):
    """1/keep rounds to 1.0 in bfloat16 at p = 0.003 (and to 1.0078 at p = 0.01): the kept
    samples must still be scaled by 1/keep on average."""
    torch.manual_seed(0)
    x = torch.randn(2048, 2, 4, 4).abs().add_(0.5).bfloat16()
    out = drop_path(x, p)
    assert out.dtype == torch.bfloat16
    kept = (out.flatten(1) != 0).any(1)
    assert 0 < (~kept).sum() < 0.1 * len(x)  # some samples dropped, whole
    scale = out[kept].double().sum() / x[kept].double().sum()
    assert abs(scale.item() * (1 - p) - 1) < 5e-4, scale.item()  # 1/keep in bf16: 2.5e-3 off


def test_the_process_group_backend_can_be_gloo_on_cuda(monkeypatch):
    """NCCL refuses two processes on one GPU; gloo takes them (DARTS_DIST_BACKEND=gloo)."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert (distributed.backend(cuda), distributed.backend(cpu)) == ("nccl", "gloo")
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")
    assert distributed.backend(cuda) == "gloo"
    for bad, dev in (("mpi", cuda), ("nccl", cpu)):
        monkeypatch.setenv(distributed.BACKEND_ENV, bad)
        with pytest.raises(ConfigError, match="DARTS_DIST_BACKEND must be gloo"):
            distributed.backend(dev)


@pytest.mark.parametrize("allow", [False, True])
def test_a_cuda_run_sets_and_logs_its_tf32_flags(allow, tmp_path, monkeypatch):
    """engine.Run.start on a CUDA device (nothing in it touches the GPU): --allow_tf32 sets the
    flags, and the log says which are on."""
    import engine

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    argv = ["--name", "x", "--dataset", "digits", *(["--allow_tf32"] if allow else [])]
    cfg = SearchConfig.from_argv(argv)
    distributed.set_tf32(not allow)  # the opposite, so that start() must set them
    device = torch.device("cuda", 0)
    run = engine.Run(cfg, "search", str(tmp_path / "x"), distributed.DistInfo(), device, None)
    try:
        with run:
            run.start("Search")
            assert distributed.tf32_flags() == {"cudnn_conv": allow, "cuda_matmul": allow}
        state = "on" if allow else "off"
        log = (tmp_path / "x" / "search.log").read_text()
        assert f"TF32: {state} for cuDNN convolutions, {state} for CUDA matmuls" in log
    finally:
        distributed.set_tf32(False)
