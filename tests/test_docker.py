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


def test_readme_docker_commands_match_the_dockerfile():
    readme, docker = read("README.md"), read("Dockerfile")
    assert "docker build -t darts ." in readme and "docker build -t darts ." in docker
    run = re.search(r"docker run --gpus all -it (.+?)python search\.py", readme, flags=re.S)
    assert run, "README lacks the docker run command"
    workdir = re.search(r"^WORKDIR\s+(\S+)$", docker, flags=re.M).group(1)
    for mount in re.findall(r"-v \"\$PWD/\w+:(\S+)\"", run.group(1)):
        assert mount.startswith(workdir + "/"), mount  # data and results land in the workdir
