"""Shared fixtures: the repository root, fake data sets in their real on-disk formats."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from datasets_fakes import allow_fake_cifar10, write_fake_cifar10, write_fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="graphviz's `dot` binary is not installed (make setup installs it with apt-get)",
)


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """A data folder holding tiny CIFAR-10, MNIST and Fashion-MNIST files; returns its path."""
    root = tmp_path / "data"
    write_fake_cifar10(str(root), n_train=40, n_test=10)
    write_fake_mnist(str(root), n_train=40, n_test=10)
    write_fake_mnist(str(root), n_train=40, n_test=10, folder="FashionMNIST")
    allow_fake_cifar10(monkeypatch)  # torchvision checks the md5 of the real CIFAR files
    return str(root)


def run_script(script, *args, cwd, timeout=600):
    """Run one of the project's scripts as a user would, from ``cwd``."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_script(path, name=None):
    """Import one of the project's scripts by its path in the repository ("scripts/x.py") as a
    module. It is registered in sys.modules under ``name`` (default: the file's stem) before it
    runs: dataclasses look their module up while it executes. Nothing runs at import: every
    script keeps its work in ``main()``."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers), the tests of a module that use one of
    its module-scoped fixtures (a whole protocol, a reference run) go to the same worker, so that
    the fixture is built once, not once per worker (``--dist loadgroup``)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        for name in info.names_closure:
            defs = info.name2fixturedefs.get(name, ())
            if any(d.scope == "module" and d.baseid.startswith("tests") for d in defs):
                # One group per module: a test may use two of its module's fixtures.
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
                break
