"""The authors' released weights (issue 15): official.py, evaluate.py --official,
augment.py --init_from and scripts/convert_official.py, on files written by the authors' own
code (tests/fixtures/official/, see its README)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ROOT, load_script, run_script
from datasets_fakes import write_image_folder

import augment
import evaluate
import genotypes as gt
import official
from config import AugmentConfig
from models.augment_cnn import AugmentCNN

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official")
CIFAR = os.path.join(FIXTURES, "cifar_darts_v2_c8_l5_aux.pt")
IMAGENET = os.path.join(FIXTURES, "imagenet_darts_v2_c8_l5_aux.pth.tar")
IMAGENET_DP = os.path.join(FIXTURES, "imagenet_darts_v2_c8_l5_aux.dataparallel.pth.tar")
# fixture -> (its expected logits, the ImageNet network?, input side)
CASES = {
    CIFAR: ("cifar_darts_v2_c8_l5_aux.expected.pt", False, 32),
    IMAGENET: ("imagenet_darts_v2_c8_l5_aux.expected.pt", True, 224),
    IMAGENET_DP: ("imagenet_darts_v2_c8_l5_aux.expected.pt", True, 224),
}
SIZE = ["--init_channels", "8", "--layers", "5"]


def network(path: str, genotype=gt.DARTS_V2, layers: int = 5, n_classes: int = 10) -> AugmentCNN:
    """This project's network for a fixture: C=8, 5 layers, with the auxiliary head."""
    _, imagenet, size = CASES[path]
    return AugmentCNN(size, 3, 8, n_classes, layers, True, genotype, imagenet=imagenet)


def expected(path: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(FIXTURES, CASES[path][0]), weights_only=True)


def eval_logits(model: AugmentCNN, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)[0]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got - want).abs().max() / want.abs().max())


def load_convert_script():
    return load_script("scripts/convert_official.py")


def one_line_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln]
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------------- the fixtures


def test_fixtures_are_the_shared_files():
    """The copies in the repository are the files the authors' code wrote."""
    shared = os.path.join(ROOT, "..", "shared", "fixtures", "official")
    if not os.path.isdir(shared):
        pytest.skip("no shared/ beside the repository")
    for name in os.listdir(shared):
        with (
            open(os.path.join(shared, name), "rb") as a,
            open(os.path.join(FIXTURES, name), "rb") as b,
        ):
            assert a.read() == b.read(), name


def test_formats_are_read_as_they_are():
    cifar, imnet, dp = (official.read_weights(p) for p in (CIFAR, IMAGENET, IMAGENET_DP))
    assert "CIFAR state_dict" in cifar.kind and not cifar.imagenet and cifar.has_aux
    assert "ImageNet checkpoint" in imnet.kind and imnet.imagenet and imnet.has_aux
    assert "module." in dp.kind and [n for n, _ in dp.tensors] == [n for n, _ in imnet.tensors]
    assert imnet.meta["epoch"] == 250 and "best_acc_top1" in imnet.meta
    assert cifar.n_classes == imnet.n_classes == 10
    # The authors' BNs carry num_batches_tracked (PyTorch >= 0.4.1 wrote these files).
    assert any(n.endswith("num_batches_tracked") for n, _ in cifar.tensors)


@pytest.mark.parametrize("path", list(CASES), ids=os.path.basename)
def test_fixture_logits_match_the_authors_network(path):
    model = network(path)
    matched = official.load(model, official.read_weights(path), "DARTS_V2")
    assert not matched.fresh and not matched.unused and not matched.notes
    assert len(matched.state) == len(model.state_dict())
    want = expected(path)
    got = eval_logits(model, want["x"])
    assert got.dtype == torch.float32 and got.shape == want["logits"].shape
    assert relative_error(got, want["logits"]) < 1e-5
    # In the layout evaluate.py runs the network in, too.
    assert relative_error(eval_logits(model.to(memory_format=torch.channels_last), want["x"]),
                          want["logits"]) < 1e-5  # fmt: skip


def test_dataparallel_keys_give_the_same_logits():
    x = expected(IMAGENET)["x"]
    logits = []
    for path in (IMAGENET, IMAGENET_DP):
        model = network(path)
        official.load(model, official.read_weights(path), "DARTS_V2")
        logits.append(eval_logits(model, x))
    assert torch.equal(logits[0], logits[1])


def test_the_order_pairs_the_same_modules():
    """Spot checks of the by-order map: each released tensor lands on its counterpart."""
    pairs = {
        CIFAR: [
            ("stem.0.weight", "stem.0.weight"),
            ("cells.0.preprocess0.op.1.weight", "cells.0.preproc0.1.weight"),
            ("cells.0._ops.0.op.5.weight", "cells.0.dag.0.0.1.1.weight"),
            ("cells.0._ops.7.op.3.running_var", "cells.0.dag.3.1.3.running_var"),
            ("cells.2.preprocess0.conv_2.weight", "cells.2.preproc0.conv2.weight"),
            ("auxiliary_head.features.6.running_mean", "aux_head.features.6.running_mean"),
            ("auxiliary_head.classifier.weight", "aux_head.linear.weight"),
            ("classifier.bias", "linear.bias"),
        ],
        IMAGENET: [
            ("stem0.3.weight", "stem0.3.weight"),
            ("stem1.2.num_batches_tracked", "stem1.2.num_batches_tracked"),
            ("cells.0.preprocess0.conv_1.weight", "cells.0.preproc0.conv1.weight"),
            ("auxiliary_head.features.5.weight", "aux_head.features.5.weight"),
            ("auxiliary_head.classifier.bias", "aux_head.linear.bias"),
        ],
    }
    for path, spots in pairs.items():
        weights = official.read_weights(path)
        names = dict(weights.tensors)
        state = official.match(network(path), weights, "DARTS_V2").state
        for theirs, ours in spots:
            assert state[ours] is not None and torch.equal(state[ours], names[theirs]), theirs


def test_an_old_file_without_batch_counters_loads():
    """PyTorch 0.3/0.4.0 (which the authors' code asks for) wrote BNs without
    num_batches_tracked: the rest maps all the same."""
    weights = official.read_weights(CIFAR)
    weights.tensors = [(n, t) for n, t in weights.tensors if not n.endswith("batches_tracked")]
    model = network(CIFAR)
    matched = official.load(model, weights, "DARTS_V2")
    assert "num_batches_tracked" in matched.notes[0]
    want = expected(CIFAR)
    assert relative_error(eval_logits(model, want["x"]), want["logits"]) < 1e-5


def test_a_network_without_auxiliary_head_leaves_the_files_unused():
    model = AugmentCNN(32, 3, 8, 10, 5, False, gt.DARTS_V2)
    matched = official.load(model, official.read_weights(CIFAR), "DARTS_V2")
    assert matched.unused and all(n.startswith("auxiliary_head.") for n in matched.unused)
    want = expected(CIFAR)
    assert relative_error(eval_logits(model, want["x"]), want["logits"]) < 1e-5


# ------------------------------------------------------------------------------ mismatches


@pytest.mark.parametrize(
    "kwargs, first",
    [
        (dict(genotype=gt.DARTS_V1), "its tensor #88 'cells.0._ops.7.op.1.weight' (8, 1, 3, 3)"),
        (dict(layers=6), "its tensor #95 'cells.1.preprocess0.op.1.weight' (16, 24, 1, 1)"),
        (dict(n_classes=100), "the file classifies 10 classes, the network 100"),
    ],
)
def test_a_network_that_does_not_fit_names_the_first_tensor(kwargs, first):
    model = network(CIFAR, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(official.OfficialWeightsError) as err:
        official.load(model, official.read_weights(CIFAR), "the network")
    msg = str(err.value)
    assert "\n" not in msg and first in msg and "does not fit the network" in msg
    assert "wrong --genotype, wrong --init_channels or --layers" in msg
    # Nothing was loaded.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_wrong_network_type_does_not_fit():
    with pytest.raises(official.OfficialWeightsError, match="'stem0.0.weight'"):
        official.load(network(CIFAR), official.read_weights(IMAGENET), "the network")


def test_a_file_that_ends_early_or_goes_on_is_refused():
    weights = official.read_weights(CIFAR)
    full = list(weights.tensors)
    weights.tensors = full[:-1]
    with pytest.raises(official.OfficialWeightsError, match="the file ends after 314 tensors"):
        official.load(network(CIFAR), weights, "n")
    weights.tensors = full + [("extra.weight", torch.zeros(3))]
    with pytest.raises(official.OfficialWeightsError, match="'extra.weight' .* no place"):
        official.load(network(CIFAR), weights, "n")


def test_unreadable_files_give_one_line(tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(CIFAR, "rb").read()[:100_000])
    with pytest.raises(official.OfficialWeightsError, match="truncated or damaged"):
        official.read_weights(str(truncated))
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: needs its class to load
    with pytest.raises(official.OfficialWeightsError, match="holds pickled code") as err:
        official.read_weights(str(pickled))
    assert "\n" not in str(err.value) and "refused" in str(err.value)
    with pytest.raises(official.OfficialWeightsError, match="no weights file at"):
        official.read_weights(str(tmp_path / "nope.pt"))
    other = tmp_path / "other.pt"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(official.OfficialWeightsError, match="not a state_dict or checkpoint"):
        official.read_weights(str(other))


# ------------------------------------------------------------------ evaluate.py --official


def test_evaluate_official_errors_exit_2_with_one_line(tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(CIFAR, "rb").read()[:100_000])
    cases = [
        (["--official", CIFAR, "--genotype", "DARTS_V1", "--dataset", "cifar10", *SIZE],
         "'cells.0._ops.7.op.1.weight'"),
        (["--official", CIFAR, "--genotype", "DARTS_V2", "--dataset", "cifar10",
          "--init_channels", "8", "--layers", "6"], "'cells.1.preprocess0.op.1.weight'"),
        (["--official", CIFAR, "--genotype", "DARTS_V2", "--dataset", "cifar10"],
         "C=36, 20 layers"),  # the published size by default
        (["--official", str(truncated), "--genotype", "DARTS_V2", "--dataset", "cifar10"],
         "truncated or damaged"),
        (["--official", CIFAR, "--dataset", "cifar10"], "--official needs --genotype"),
        (["--checkpoint", CIFAR, "--genotype", "DARTS_V2"], "--genotype applies to --official"),
    ]  # fmt: skip
    for argv, text in cases:
        assert evaluate.main(argv) == 2, argv
        err = one_line_error(capsys.readouterr().err)
        assert err.startswith("evaluate.py: error: ") and text in err, err


def test_evaluate_official_on_cifar10(fake_data, capsys):
    argv = ["--official", CIFAR, "--genotype", "DARTS_V2", "--dataset", "cifar10", *SIZE]
    argv += ["--data_path", fake_data, "--workers", "0", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "Loaded 315 tensors" in out and "Test loss" in out and "top5" in out


def test_evaluate_official_on_an_imagenet_folder(tmp_path, capsys):
    """The ImageNet network, ImageNet's transform and constants, on a 10-class image folder."""
    root = tmp_path / "imagenet"
    write_image_folder(str(root), n_classes=10, per_class=1)
    argv = ["--official", IMAGENET_DP, "--genotype", "DARTS_V2", "--dataset", "imagenet", *SIZE]
    argv += ["--data_path", str(root), "--workers", "0", "--device", "cpu", "--batch_size", "8"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "Loaded 323 tensors" in out and "module. keys" in out and "Test loss" in out
    # Any image folder: the file holds the ImageNet network, which --dataset folder then is.
    argv[argv.index("imagenet")] = "folder"
    assert evaluate.main(argv) == 0
    assert "Loaded 323 tensors" in capsys.readouterr().out


@pytest.mark.slow
def test_errors_exit_2_as_scripts(tmp_path):
    """As a user runs them: exit status 2 and one line on stderr."""
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(open(IMAGENET, "rb").read()[:50_000])
    res = run_script(
        "evaluate.py", "--official", CIFAR, "--genotype", "DARTS_V1", "--dataset", "cifar10",
        *SIZE, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2 and "'cells.0._ops.7.op.1.weight'" in one_line_error(res.stderr)
    out = str(tmp_path / "x.pth.tar")
    for args, text in [
        ([IMAGENET, "--genotype", "DARTS_V2", *SIZE[:2], "--layers", "6"], "does not fit"),
        ([str(truncated), "--genotype", "DARTS_V2"], "truncated or damaged"),
        ([IMAGENET, "--genotype", "DARTS_V1", *SIZE], "does not fit DARTS_V1"),
    ]:
        res = run_script("scripts/convert_official.py", *args, "--out", out, cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        line = one_line_error(res.stderr)
        assert line.startswith("convert_official.py: error: ") and text in line, line
    assert not os.path.exists(out)


# ----------------------------------------------------------------- convert_official.py


def test_convert_writes_a_checkpoint_evaluate_reads(fake_data, tmp_path, capsys):
    convert = load_convert_script()
    out = tmp_path / "v2_cifar.pth.tar"
    assert convert.main([CIFAR, "--genotype", "DARTS_V2", *SIZE, "--out", str(out)]) == 0
    assert "Wrote" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert {"model", "config", "genotype", "epoch"} <= set(state)
    cfg = state["config"]
    assert (cfg["dataset"], cfg["init_channels"], cfg["layers"]) == ("cifar10", 8, 5)
    assert cfg["aux_weight"] > 0 and not cfg["imagenet_stem"]
    assert gt.from_str(state["genotype"]) == gt.DARTS_V2
    # The network its config describes gives the authors' logits.
    model = augment.build_model(AugmentConfig(**cfg), gt.from_str(state["genotype"]))
    model.load_state_dict(state["model"])
    want = expected(CIFAR)
    assert relative_error(eval_logits(model, want["x"]), want["logits"]) < 1e-5
    argv = ["--checkpoint", str(out), "--data_path", fake_data, "--workers", "0"]
    assert evaluate.main([*argv, "--device", "cpu"]) == 0
    assert "Test loss" in capsys.readouterr().out


def test_convert_an_imagenet_checkpoint(tmp_path, capsys):
    convert = load_convert_script()
    out = tmp_path / "v2.pth.tar"
    assert convert.main([IMAGENET_DP, "--genotype", "DARTS_V2", *SIZE, "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    cfg = state["config"]
    assert cfg["dataset"] == "imagenet" and cfg["imagenet_stem"] and state["epoch"] == 250
    model = network(IMAGENET)
    model.load_state_dict(state["model"])
    want = expected(IMAGENET)
    assert relative_error(eval_logits(model, want["x"]), want["logits"]) < 1e-5
    # On a 10-class image folder, as a user would evaluate it.
    root = tmp_path / "imagenet"
    write_image_folder(str(root), n_classes=10, per_class=1)
    argv = ["--checkpoint", str(out), "--data_path", str(root), "--workers", "0"]
    assert evaluate.main([*argv, "--device", "cpu"]) == 0


# ---------------------------------------------------------------- augment.py --init_from


def folder_config(root: str, init_from: str, *extra: str) -> AugmentConfig:
    return AugmentConfig.from_argv(
        ["--name", "ft", "--dataset", "folder", "--data_path", root, "--genotype", "DARTS_V2",
         "--imagenet_stem", "--image_size", "64", "--init_from", init_from, *SIZE, *extra]
    )  # fmt: skip


@pytest.mark.parametrize("path", [IMAGENET, CIFAR])
def test_init_from_loads_all_but_the_classifiers_and_trains(path, tmp_path):
    root = tmp_path / "birds"
    write_image_folder(str(root), n_classes=3)
    extra = () if path == IMAGENET else ("--image_size", "32")
    cfg = folder_config(str(root), path, *extra)
    if path == CIFAR:
        cfg.imagenet_stem = False
    matched = augment.init_weights(cfg, gt.DARTS_V2)
    assert sorted(matched.fresh) == sorted(official.CLASSIFIERS)
    assert "new classifiers for 3 classes (the file's classify 10)" in matched.summary()
    torch.manual_seed(0)
    model = augment.build_model(cfg, gt.DARTS_V2)
    official.apply(model, matched)
    # Every tensor but the classifiers is the file's, in order.
    file_tensors = [t for n, t in official.read_weights(path).tensors if "classifier" not in n]
    ours = [(k, v) for k, v in model.state_dict().items() if k not in official.CLASSIFIERS]
    assert len(file_tensors) == len(ours)
    assert all(torch.equal(v, t) for (_, v), t in zip(ours, file_tensors))
    assert model.linear.weight.shape == (3, model.linear.in_features)
    assert model.aux_head.linear.weight.shape == (3, 768)
    # One training step.
    size = cfg.image_size
    opt = torch.optim.SGD(model.parameters(), 0.01)
    X, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    before = model.linear.weight.clone()
    loss, logits = augment.train_step(model.train(), opt, X, y, 0.4, 5.0)
    assert torch.isfinite(loss) and logits.shape == (4, 3)
    assert not torch.equal(model.linear.weight, before)


def test_init_from_the_same_class_count_loads_everything(tmp_path):
    root = tmp_path / "ten"
    write_image_folder(str(root), n_classes=10, per_class=1)
    matched = augment.init_weights(folder_config(str(root), IMAGENET), gt.DARTS_V2)
    assert not matched.fresh and "new classifiers" not in matched.summary()


def test_init_from_a_checkpoint_of_this_project(tmp_path):
    convert = load_convert_script()
    ckpt = tmp_path / "v2.pth.tar"
    assert convert.main([IMAGENET, "--genotype", "DARTS_V2", *SIZE, "--out", str(ckpt)]) == 0
    root = tmp_path / "birds"
    write_image_folder(str(root), n_classes=3)
    matched = augment.init_weights(folder_config(str(root), str(ckpt)), gt.DARTS_V2)
    assert "a checkpoint of this project" in matched.summary()
    assert sorted(matched.fresh) == sorted(official.CLASSIFIERS)
    want = dict(official.read_weights(IMAGENET).tensors)["cells.3.preprocess1.op.1.weight"]
    assert torch.equal(matched.state["cells.3.preproc1.1.weight"], want)


def net_of(cfg: AugmentConfig) -> tuple:
    return cfg.init_channels, cfg.layers, cfg.imagenet_stem, cfg.image_size, cfg.normalize


def test_init_from_defaults_to_the_network_of_the_file(tmp_path, monkeypatch, capsys):
    root = tmp_path / "birds"
    write_image_folder(str(root), n_classes=3)
    base = ["--name", "ft", "--dataset", "folder", "--data_path", str(root)]
    base += ["--genotype", "DARTS_V2", "--init_from"]
    cfg = AugmentConfig.from_argv(base + [IMAGENET])
    imagenet_norm = "0.485,0.456,0.406/0.229,0.224,0.225"
    assert net_of(cfg) == (48, 14, True, 224, imagenet_norm)  # the authors' ImageNet network
    cfg = AugmentConfig.from_argv(base + [IMAGENET, *SIZE, "--image_size", "64"])
    assert net_of(cfg) == (8, 5, True, 64, imagenet_norm)  # flags given win
    assert net_of(AugmentConfig.from_argv(base + [CIFAR])) == (36, 20, False, 0, "auto")
    ckpt = str(tmp_path / "v2.pth.tar")
    assert (
        load_convert_script().main([IMAGENET, "--genotype", "DARTS_V2", *SIZE, "--out", ckpt]) == 0
    )
    assert net_of(AugmentConfig.from_argv(base + [ckpt]))[:3] == (8, 5, True)
    # The command, on the small fixture: the published size does not fit it.
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert augment.main(base + [IMAGENET, "--epochs", "30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit DARTS_V2 (ImageNet network, C=48, 14 layers, 3 classes)" in err


def test_init_from_checks_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "birds"
    write_image_folder(str(root), n_classes=3)
    base = ["--name", "ft", "--dataset", "folder", "--data_path", str(root), "--imagenet_stem",
            "--image_size", "64", "--normalize", "imagenet", *SIZE, "--workers", "0",
            "--epochs", "1"]  # fmt: skip
    for extra, text in [
        (["--genotype", "DARTS_V1", "--init_from", IMAGENET], "does not fit DARTS_V1"),
        (["--genotype", "DARTS_V2", "--init_from", "nope.pt"], "--init_from: no file at"),
    ]:
        assert augment.main(base + extra) == 2
        assert text in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "augments").exists()


@pytest.mark.slow
def test_fine_tune_one_epoch_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "birds"
    write_image_folder(str(root), n_classes=3)
    argv = ["--name", "ft", "--dataset", "folder", "--data_path", str(root), "--imagenet_stem",
            "--image_size", "64", "--genotype", "DARTS_V2", "--init_from", IMAGENET_DP, *SIZE,
            "--epochs", "1", "--batch_size", "4", "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert augment.main(argv) == 0
    log = (tmp_path / "augments" / "ft" / "augment.log").read_text()
    assert "Loaded 319 tensors" in log and "new classifiers for 3 classes" in log
    assert "mult-adds" in log
    saved = json.loads((tmp_path / "augments" / "ft" / "config.json").read_text())
    assert saved["init_from"] == IMAGENET_DP
