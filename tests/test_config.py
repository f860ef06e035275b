"""The configs' command line: choices, the sections of --help, --config (a run started from a
saved config.json), the code version a run records, and what importing architect.py costs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import checkpoint
import config
import search
import utils
from config import GROUPS, AugmentConfig, BaseConfig, ConfigError, SearchConfig

SEARCH = ["--name", "x", "--dataset", "digits"]
AUGMENT = [*SEARCH, "--genotype", "DARTS_V2"]
IMAGENET_WEIGHTS = os.path.join(ROOT, "tests", "fixtures", "official")
IMAGENET_WEIGHTS = os.path.join(IMAGENET_WEIGHTS, "imagenet_darts_v2_c8_l5_aux.pth.tar")


def base_argv(cls: type[BaseConfig]) -> list[str]:
    return AUGMENT if cls is AugmentConfig else SEARCH


def choice_fields(cls: type[BaseConfig]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "choices" in f.metadata]


# --------------------------------------------------------------------------------------------
# Importing architect.py
# --------------------------------------------------------------------------------------------
def test_importing_architect_needs_neither_torchvision_nor_the_weight_files():
    """architect.py holds HESSIAN_MODES, so it imports no config (whose data sets import
    torchvision, whose --init_from reads the authors' weight files through official.py)."""
    heavy = ["torchvision", "official", "preproc", "config"]
    code = f"import sys, architect; print(sorted(set(sys.modules) & set({heavy!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    import architect

    assert config.HESSIAN_MODES is architect.HESSIAN_MODES  # one list, where it is used


# --------------------------------------------------------------------------------------------
# choices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, name",
    [(c, f.name) for c in (SearchConfig, AugmentConfig) for f in choice_fields(c)],
)
def test_a_value_outside_the_choices_is_refused_in_one_line(cls, name):
    """From the command line (argparse) and from anywhere else (a --config file, a config built
    in code: check()), one line naming the flag, the value and every choice."""
    choices = {f.name: f.metadata.get("choices") for f in choice_fields(cls)}[name]
    words = f"--{name}: invalid choice: 'bogus' (choose from {', '.join(map(repr, choices))})"
    with pytest.raises(ConfigError) as e:
        cls.from_argv([*base_argv(cls), f"--{name}", "bogus"])
    assert str(e.value) == words
    cfg = cls.from_argv(base_argv(cls))
    setattr(cfg, name, "bogus")
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert str(e.value) == words
    for value in choices:  # and every choice is taken (--early_stop eigen needs the eigenvalue)
        argv = [*base_argv(cls), f"--{name}", value, "--hessian_eigen", "1"]
        if cls is AugmentConfig:
            argv = argv[:-2]
        assert getattr(cls.from_argv(argv), name) == value


def test_the_choices_are_the_lists_the_code_uses():
    from architect import HESSIAN_MODES
    from models.kernels import KERNEL_MODES
    from preproc import DATASETS

    fields = {f.name: f.metadata.get("choices") for f in dataclasses.fields(AugmentConfig)}
    fields.update({f.name: f.metadata.get("choices") for f in dataclasses.fields(SearchConfig)})
    assert fields["dataset"] == DATASETS and fields["kernels"] == KERNEL_MODES
    assert fields["hessian"] == HESSIAN_MODES and fields["early_stop"] == ("none", "skip", "eigen")
    assert fields["lr_schedule"] == ("cosine", "step", "linear")
    assert fields["amp"] == ("none", "bf16", "fp16")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--name", "x"], "the following arguments are required: --dataset"),
        ([*SEARCH, "--epochs", "two"], "--epochs: invalid int value: 'two'"),
        ([*SEARCH, "--w_lr", "fast"], "--w_lr: invalid float value: 'fast'"),
        ([*SEARCH, "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_argparse_errors_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        SearchConfig.from_argv(argv)
    assert str(e.value) == message


# --------------------------------------------------------------------------------------------
# The sections of --help
# --------------------------------------------------------------------------------------------
def help_sections(cls: type[BaseConfig]) -> dict[str, list[str]]:
    """The flags of each section of --help, by title (a flag's line is indented by two spaces;
    the help text, by more)."""
    text = cls.parser(cls.__doc__ or "", config=True).format_help()
    sections: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title is not None and line.startswith("  --"):
            sections[title].append(line.split()[0])
    return sections


@pytest.mark.parametrize("cls", [SearchConfig, AugmentConfig])
def test_help_lists_each_flag_in_its_section(cls):
    sections = help_sections(cls)
    titles = [t for t in sections if t in GROUPS.values()]
    assert titles == [t for t in GROUPS.values() if t in sections]  # in the order of GROUPS
    assert len(titles) >= 5  # run, data, model, optimisation, device (and the alphas)
    for f in dataclasses.fields(cls):
        holders = [t for t, flags in sections.items() if f"--{f.name}" in flags]
        assert holders == [GROUPS[f.metadata["group"]]], f.name
    assert "--config" in sections[GROUPS["run"]]
    text = cls.parser(cls.__doc__ or "", config=True).format_help()
    assert "--seed SEED random seed (default: 2)" in " ".join(text.split())  # every default


# --------------------------------------------------------------------------------------------
# --config
# --------------------------------------------------------------------------------------------
def saved_config(tmp_path, cfg: BaseConfig, **edit) -> str:
    """The config.json of ``cfg`` (BaseConfig.save), with ``edit`` applied (None: removed)."""
    path = tmp_path / "config.json"
    cfg.save(str(path))
    data = json.loads(path.read_text())
    for k, v in edit.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    path.write_text(json.dumps(data))
    return str(path)


def test_config_takes_the_files_settings_and_the_flags_given_win(tmp_path):
    first = SearchConfig.from_argv([*SEARCH, "--layers", "5", "--w_lr", "0.1", "--first_order"])
    path = saved_config(tmp_path, first)
    cfg = SearchConfig.from_argv(["--config", path, "--name", "y", "--w_lr", "0.2"])
    assert cfg.name == "y" and cfg.w_lr == 0.2  # given
    assert cfg.layers == 5 and cfg.first_order  # the file's
    assert cfg.to_dict() == {**first.to_dict(), "name": "y", "w_lr": 0.2}
    # --name and --dataset are required, unless the file gives them
    assert SearchConfig.from_argv(["--config", path]).to_dict() == first.to_dict()


def test_config_never_carries_resume_over(tmp_path):
    path = saved_config(tmp_path, SearchConfig.from_argv([*SEARCH, "--resume"]))
    assert not SearchConfig.from_argv(["--config", path]).resume
    assert SearchConfig.from_argv(["--config", path, "--resume"]).resume


def test_the_dataset_recipe_does_not_override_the_file(tmp_path):
    """--dataset imagenet's recipe fills only what neither the command line nor the file
    gives."""
    argv = [*AUGMENT, "--dataset", "imagenet", "--epochs", "7", "--lr", "0.3"]
    first = AugmentConfig.from_argv(argv)
    assert (first.epochs, first.lr, first.weight_decay) == (7, 0.3, 3e-5)  # the recipe's wd
    path = saved_config(tmp_path, first, weight_decay=1e-4)
    cfg = AugmentConfig.from_argv(["--config", path])
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.layers) == (7, 0.3, 1e-4, 14)
    # A file that leaves a setting out: the recipe gives it (where the flag is not given).
    path = saved_config(tmp_path, first, lr=None, layers=None)
    cfg = AugmentConfig.from_argv(["--config", path, "--layers", "6"])
    assert (cfg.epochs, cfg.lr, cfg.layers) == (7, 0.1, 6)


def test_the_init_from_defaults_do_not_override_the_file(tmp_path):
    """--init_from's network (the authors' ImageNet one: C 48, 14 layers, its stems) is the
    default for what the file does not say."""
    argv = [*AUGMENT, "--init_from", IMAGENET_WEIGHTS]
    first = AugmentConfig.from_argv(argv)
    assert (first.init_channels, first.layers, first.imagenet_stem) == (48, 14, True)
    path = saved_config(tmp_path, first, init_channels=8, layers=5)
    cfg = AugmentConfig.from_argv(["--config", path])
    assert (cfg.init_channels, cfg.layers, cfg.imagenet_stem) == (8, 5, True)
    path = saved_config(tmp_path, first, init_channels=None, layers=7)
    cfg = AugmentConfig.from_argv(["--config", path])
    assert (cfg.init_channels, cfg.layers) == (48, 7)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--config: cannot read {path}: No such file or directory"),
        ("{", "--config: {path} is not a JSON file (Expecting property name"),
        ("[1, 2]", "--config: {path} holds no JSON object of settings"),
        (
            '{"epochs": 1, "w_lrr": 0.1, "genotype": "DARTS_V2"}',
            "--config: {path} holds unknown settings: w_lrr, genotype",
        ),
        ('{"epochs": 1.5}', "--config: epochs in {path} must be of type int, got 1.5"),
        ('{"first_order": 1}', "--config: first_order in {path} must be of type bool, got 1"),
        ('{"kernels": "gpu"}', "--kernels: invalid choice: 'gpu' (choose from 'auto'"),
        ('{"layers": 2}', "--layers must be >= 3 to hold the two reduction cells, got 2"),
    ],
)
def test_a_bad_config_file_is_refused_in_one_line(content, message, tmp_path, monkeypatch, capsys):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.chdir(tmp_path)
    code = search.main(["--config", str(path), *SEARCH])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("search.py: error: " + message.format(path=path)), err
    assert err.count("\n") == 1
    assert not (tmp_path / "searchs").exists()


def test_config_accepts_the_code_version_and_an_int_for_a_float(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"code_version": "0123abc-dirty", "w_lr": 1}')
    cfg = SearchConfig.from_argv(["--config", str(path), *SEARCH])
    assert cfg.w_lr == 1.0 and isinstance(cfg.w_lr, float)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


@pytest.mark.slow
def test_config_reproduces_a_search(tmp_path, monkeypatch, capsys):
    """A tiny search, then the same search from its own config.json under another name: the
    same config.json but for the name, the same metrics on the CPU but for the times."""
    monkeypatch.chdir(tmp_path)
    argv = ["--name", "a", "--dataset", "digits", "--epochs", "1", "--layers", "3"]
    argv += ["--init_channels", "4", "--nodes", "2", "--batch_size", "128", "--workers", "0"]
    argv += ["--seed", "5"]
    assert search.main(argv) == 0
    a = tmp_path / "searchs" / "a"
    assert search.main(["--config", str(a / "config.json"), "--name", "b"]) == 0
    b = tmp_path / "searchs" / "b"
    config_a = json.loads((a / "config.json").read_text())
    config_b = json.loads((b / "config.json").read_text())
    assert config_a["seed"] == 5 and config_a["layers"] == 3  # not the defaults
    assert config_b == {**config_a, "name": "b"}
    rows_a = utils.read_jsonl(str(a / "metrics.jsonl"))
    rows_b = utils.read_jsonl(str(b / "metrics.jsonl"))
    assert len(rows_a) == 1 and "train_loss" in rows_a[0]
    assert without_time(rows_b) == without_time(rows_a)
    # The code version is recorded in config.json and in the checkpoint.
    assert config_a["code_version"] == utils.code_version()
    state = checkpoint.load_checkpoint(str(a / checkpoint.CHECKPOINT))
    assert state["code_version"] == utils.code_version()
    assert "code_version" not in state["config"]  # not a setting: a resume may change it


# --------------------------------------------------------------------------------------------
# The code version
# --------------------------------------------------------------------------------------------
def git(repo, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    cmd += ["-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository holding a small project: a.py, models/b.py, notes.txt."""
    try:
        git(tmp_path, "init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed here")
    (tmp_path / "models").mkdir()
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "models" / "b.py").write_text("B = 2\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def test_the_code_version_is_the_commit_and_says_dirty(repo):
    head = git(repo, "rev-parse", "HEAD")
    assert len(head) == 40 and utils.version_of(str(repo)) == head
    (repo / "c.py").write_text("C = 3\n")  # untracked: not the commit's code, but not a change
    assert utils.version_of(str(repo)) == head
    (repo / "a.py").write_text("A = 2\n")
    assert utils.version_of(str(repo)) == head + "-dirty"
    git(repo, "commit", "-q", "-am", "two")
    assert utils.version_of(str(repo)) == git(repo, "rev-parse", "HEAD") != head


def test_without_git_the_code_version_is_a_hash_of_the_sources(repo, monkeypatch):
    with_git = utils.version_of(str(repo))
    monkeypatch.setenv("PATH", "")  # no git to run
    version = utils.version_of(str(repo))
    assert version == "source-sha256:" + utils.source_hash(str(repo)) and version != with_git
    (repo / "notes.txt").write_text("changed\n")  # not a source file
    assert utils.version_of(str(repo)) == version
    (repo / "models" / "b.py").write_text("B = 3\n")
    assert utils.version_of(str(repo)) != version
    # A folder that is no repository (a Docker image's copy) gets the same hash of its sources.
    monkeypatch.undo()
    os.remove(repo / "notes.txt")
    os.rename(repo / ".git", repo / "git-was-here")
    assert utils.version_of(str(repo)) == "source-sha256:" + utils.source_hash(str(repo))


def test_the_project_records_its_commit(monkeypatch):
    """utils.code_version() is this project's: its commit where it is a git checkout."""
    try:
        head = git(ROOT, "rev-parse", "HEAD")
        top = git(ROOT, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the project is not a git checkout here (a Docker image, an archive)")
    if os.path.realpath(top) != os.path.realpath(ROOT):
        pytest.skip("the project is a folder of another git repository")
    assert utils.code_version().removesuffix("-dirty") == head
    assert utils.code_version() is utils.code_version()  # computed once


def test_every_checkpoint_records_the_code_version_and_a_resume_may_change_it(
    tmp_path, monkeypatch
):
    cfg = SearchConfig.from_argv(SEARCH).to_dict()
    monkeypatch.setattr(checkpoint, "code_version", lambda: "1111111")
    checkpoint.save_checkpoint(
        {"model": {"w": torch.ones(2)}, "config": cfg}, str(tmp_path / checkpoint.CHECKPOINT)
    )
    monkeypatch.setattr(checkpoint, "code_version", lambda: "2222222-dirty")
    state = checkpoint.check_resume(str(tmp_path), cfg, resume=True)
    assert state is not None and state["code_version"] == "1111111"
