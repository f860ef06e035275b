"""The Dockerfile cannot be built here (no Docker engine); check what can be checked."""

import glob
import os
import re

from conftest import ROOT


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_every_file_the_dockerfile_copies_exists():
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", read("Dockerfile"), flags=re.M)
    assert copies
    for line in copies:
        for src in line.split():
            assert glob.glob(os.path.join(ROOT, src)), f"COPY {src}: nothing to copy"
    # the scripts and the models package are in the image
    assert "*.py" in " ".join(copies) and "models/" in " ".join(copies)


def test_dockerfile_installs_graphviz_and_the_requirements():
    text = read("Dockerfile")
    assert re.search(r"^FROM pytorch/pytorch:\S+-cuda\S+-runtime$", text, flags=re.M)
    assert "apt-get install -y --no-install-recommends graphviz" in text
    assert "pip install --no-cache-dir -r requirements.txt" in text


DOCKER_PAGE = "docs/scale.md"  # where the user docs give the Docker commands


def test_docs_docker_commands_match_the_dockerfile():
    page, docker = read(DOCKER_PAGE), read("Dockerfile")
    assert "docker build -t darts ." in page and "docker build -t darts ." in docker
    run = re.search(r"docker run --gpus all -it (.+?)python search\.py", page, flags=re.S)
    assert run, f"{DOCKER_PAGE} lacks the docker run command"
    workdir = re.search(r"^WORKDIR\s+(\S+)$", docker, flags=re.M).group(1)
    for mount in re.findall(r"-v \"\$PWD/\w+:(\S+)\"", run.group(1)):
        assert mount.startswith(workdir + "/"), mount  # data and results land in the workdir


def make_variable(name):
    m = re.search(rf"^{name}\s*:=\s*(\S+)\s*$", read("Makefile"), flags=re.M)
    assert m, f"Makefile lacks {name}"
    return m.group(1)


def test_dockerfile_base_image_is_the_pytorch_that_make_test_compat_runs():
    """`make test-compat` runs the tests on COMPAT_TORCH; the image must ship that PyTorch."""
    torch_version = make_variable("COMPAT_TORCH")
    base = re.search(r"^FROM pytorch/pytorch:(\S+?)-cuda", read("Dockerfile"), flags=re.M)
    assert base, "Dockerfile's FROM is not a pytorch/pytorch:<version>-cuda... tag"
    assert base.group(1) == torch_version, (
        f"the image ships torch {base.group(1)}, make test-compat tests {torch_version}: "
        "change both, then run make test-compat"
    )


def test_compat_torchvision_is_the_one_built_for_the_compat_torch():
    """torchvision 0.(15 + m) is built for torch 2.m (0.20 for 2.5), the pair of the image."""
    major, minor = (int(x) for x in make_variable("COMPAT_TORCH").split(".")[:2])
    vision = [int(x) for x in make_variable("COMPAT_VISION").split(".")[:2]]
    assert major == 2 and vision == [0, 15 + minor]


def test_requirements_floor_is_the_pytorch_make_test_compat_passed_on():
    """The floor is a version the tests passed on, not a guess; the image's own PyTorch is it."""
    reqs = read("requirements.txt")
    for package, variable in (("torch", "COMPAT_TORCH"), ("torchvision", "COMPAT_VISION")):
        floor = re.search(rf"^{package}>=(\S+)", reqs, flags=re.M)
        assert floor, f"requirements.txt lacks a {package}>= floor"
        assert floor.group(1) == make_variable(variable), package


def test_make_test_compat_runs_the_fast_tests_in_its_own_venv_outside_make_test():
    make = read("Makefile")
    recipe = re.search(r"^test-compat:.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert '$(COMPAT_BIN)/python -m pytest -m "not slow"' in recipe
    install = re.search(r"^\$\(COMPAT_STAMP\):.*\n((?:\t.*\n)+)", make, flags=re.M).group(1)
    assert "torch==$(COMPAT_TORCH) torchvision==$(COMPAT_VISION)" in install
    assert "-r requirements-dev.txt" in install
    assert "test-compat" not in re.search(r"^test:(.*)$", make, flags=re.M).group(1)
    # the 4 GB venv stays out of git and out of the Docker build context
    venv = make_variable("COMPAT_VENV")
    assert venv + "/" in read(".gitignore").split()
    assert venv in read(".dockerignore").split()


def test_docker_smoke_target_is_the_documented_smoke_run():
    smoke = "python search.py --name smoke --dataset digits --epochs 1 --layers 5 --init_channels 8"
    target = re.search(r"^docker-smoke:.*\n((?:\t.*\n)+)", read("Makefile"), flags=re.M)
    assert target, "Makefile lacks docker-smoke"
    recipe = " ".join(target.group(1).replace("\\\n", " ").split())
    assert "docker build -t darts ." in recipe
    assert "docker run --gpus all" in recipe and recipe.endswith("darts " + smoke)
    page = " ".join(read(DOCKER_PAGE).replace("\\\n", " ").split())
    assert re.search(r"docker run --gpus all [^`]*darts " + re.escape(smoke), page)
    assert "make docker-smoke" in page


def docker_runs(text):
    """Every `docker run ...` command in ``text`` (docs, Makefile, Dockerfile), continuation
    lines joined and comment marks dropped."""
    joined = re.sub(r"\\\n[\s#]*", " ", text)
    return [m.group(0) for m in re.finditer(r"docker run [^\n`]*", joined)]


def test_every_docker_run_shares_the_host_ipc_and_keeps_both_run_folders():
    """Docker's default /dev/shm is 64 MB, and the loader workers pass batches through it (one
    ImageNet batch of 128 is 77 MB); a run's results must outlive the container."""
    runs = {name: docker_runs(read(name)) for name in (DOCKER_PAGE, "Makefile", "Dockerfile")}
    assert all(runs.values()), runs
    pages = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]
    runs.update({name: docker_runs(read(name)) for name in pages if name != DOCKER_PAGE})
    for name, commands in runs.items():
        for cmd in commands:
            assert "--ipc=host" in cmd or "--shm-size" in cmd, f"{name}: {cmd}"
            if " -v " in cmd:  # a run whose results are kept: both stages' folders
                for folder in ("searchs", "augments"):
                    assert f'-v "$PWD/{folder}:/workspace/darts/{folder}"' in cmd, (name, cmd)
