"""Image folders (--dataset folder / imagenet): reading, bad data, normalisation, the ImageNet
recipe, and the scripts end to end on a generated folder."""

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script
from datasets_fakes import write_image_folder

import augment
import search
from config import AugmentConfig
from preproc import DataError, dataset_info, get_dataset, resolve_normalize, skipped_files


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    bad = write_image_folder(str(root))
    return str(root), bad


def test_folder_reads_rgb_of_every_mode_and_skips_bad_files(folder, capsys):
    root, bad = folder
    assert dataset_info("folder", root).input_size == 32  # the default --image_size
    info = dataset_info("folder", root, 16)
    assert (info.input_size, info.input_channels, info.n_classes) == (16, 3, 3)
    data = get_dataset("folder", root, train=True, augment=True, image_size=16, cutout_length=4)
    assert len(data) == 13  # 12 images and the truncated one; notes.txt is left out
    err = capsys.readouterr().err
    assert f"WARNING: skipped {bad['not_image']}: not an image file" in err
    # named once, by the --normalize auto pass over the training images
    assert err.count(f"WARNING: skipped {bad['truncated']}: ") == 1
    labels = []
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32  # grayscale, CMYK: RGB
        labels.append(y)
    assert sorted(set(labels)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert f"WARNING: skipped {bad['truncated']}" not in err  # not again: once per run
    assert skipped_files(torch.utils.data.Subset(data, [0])) == (1, 1)
    test = get_dataset("folder", root, train=False, image_size=16)
    assert len(test) == 6 and test[0][0].shape == (3, 16, 16)


def test_normalize_auto_is_computed_from_the_training_images_once(folder):
    root, _ = folder
    text = resolve_normalize("folder", root, 16, "auto")
    mean, std = (tuple(map(float, part.split(","))) for part in text.split("/"))
    assert len(mean) == len(std) == 3 and all(0.2 < m < 0.8 for m in mean)
    assert resolve_normalize("folder", root, 16, "auto") == text  # the same again on --resume
    data = get_dataset("folder", root, train=False, image_size=16, normalize=text)
    assert "Normalize(mean=" in repr(data.transform) and f"{mean[0]}" in repr(data.transform)
    assert resolve_normalize("imagenet", root, 0, "auto").startswith("0.485,0.456,0.406/")
    assert resolve_normalize("folder", root, 0, "imagenet").startswith("0.485,")
    assert resolve_normalize("cifar10", root, 0, "auto") == "auto"
    with pytest.raises(DataError, match="--normalize applies to image folders only"):
        resolve_normalize("cifar10", root, 0, "imagenet")
    with pytest.raises(DataError, match="--normalize must be auto, imagenet or MEAN/STD"):
        get_dataset("folder", root, train=True, normalize="bright")


def _bad(root):
    """Each bad layout, built from a good one: (how, expected message)."""
    return {
        "missing": (lambda: shutil.rmtree(root), "no image folder at"),
        "empty train": (
            lambda: [shutil.rmtree(os.path.join(root, "train")), os.mkdir(f"{root}/train")],
            "holds no class folders",
        ),
        "class without images": (
            lambda: os.mkdir(os.path.join(root, "train", "class_9")),
            "class_9 holds no images",
        ),
        "classes differ": (
            lambda: shutil.rmtree(os.path.join(root, "val", "class_2")),
            "only in train: class_2; only in val: -",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing", "empty train", "class without images", "classes differ"]
)
def test_bad_folders_give_one_line_and_exit_2(case, folder, tmp_path, monkeypatch, capsys):
    root, _ = folder
    damage, message = _bad(root)[case]
    damage()
    monkeypatch.chdir(tmp_path)
    args = ["--name", "b", "--dataset", "folder", "--data_path", root, "--epochs", "1"]
    args += ["--genotype", "DARTS_V2", "--workers", "0", "--layers", "3", "--init_channels", "4"]
    assert augment.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("augment.py: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "augments").exists()  # nothing written


def test_image_size_applies_to_folders_only(capsys):
    assert search.main(["--name", "x", "--dataset", "digits", "--image_size", "16"]) == 2
    assert "--image_size applies to image folders" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The ImageNet recipe
# --------------------------------------------------------------------------------------------
def test_imagenet_defaults_are_the_recipe_and_given_flags_win():
    base = ["--name", "x", "--genotype", "DARTS_V2", "--data_path", "/nowhere"]
    cfg = AugmentConfig.from_argv([*base, "--dataset", "imagenet", "--lr", "0.5"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (250, 128, 0.5, 3e-5)
    assert (cfg.lr_schedule, cfg.lr_gamma, cfg.label_smoothing) == ("step", 0.97, 0.1)
    assert (cfg.init_channels, cfg.layers, cfg.drop_path_prob, cfg.aux_weight) == (48, 14, 0.0, 0.4)
    assert cfg.imagenet_stem and cfg.grad_clip == 5.0 and cfg.cutout_length == 0
    cifar = AugmentConfig.from_argv([*base, "--dataset", "cifar10"])
    assert (cifar.epochs, cifar.lr, cifar.lr_schedule, cifar.label_smoothing) == (
        600,
        0.025,
        "cosine",
        0.0,
    )
    assert not cifar.imagenet_stem


def lrs(cfg, epochs):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), cfg.lr)
    sched = augment.make_scheduler(opt, cfg)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_imagenet_lr_is_multiplied_by_0_97_after_every_epoch():
    cfg = AugmentConfig(name="x", dataset="imagenet", genotype="DARTS_V2", lr=0.1, epochs=250)
    cfg.lr_schedule, cfg.lr_gamma = "step", 0.97
    got = lrs(cfg, 250)
    assert got[0] == pytest.approx(0.1) and got[1] == pytest.approx(0.097)
    assert got[249] == pytest.approx(0.1 * 0.97**249)


def test_warmup_then_linear_decay():
    cfg = AugmentConfig(name="x", dataset="digits", genotype="DARTS_V2", lr=0.5, epochs=10)
    cfg.lr_schedule, cfg.warmup_epochs = "linear", 5
    got = lrs(cfg, 10)
    assert got[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert got[5:] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    cfg.lr_schedule = "cosine"
    got = lrs(cfg, 10)
    assert got[5:] == pytest.approx([0.25 * (1 + math.cos(math.pi * e / 5)) for e in range(5)])


def test_label_smoothed_loss_is_pytorchs():
    import genotypes as gt
    from models.augment_cnn import AugmentCNN

    torch.manual_seed(0)
    model = AugmentCNN(8, 1, 4, 10, 3, True, gt.DARTS_V2)
    X, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    opt = torch.optim.SGD(model.parameters(), 0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits, aux = model(X)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)
    expected = expected + 0.4 * F.cross_entropy(aux, y, label_smoothing=0.1)
    model.load_state_dict(state)  # the BN statistics of one forward only
    loss, _ = augment.train_step(model, opt, X, y, 0.4, 5.0, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected.detach())
    assert not torch.allclose(loss, augment.train_step(model, opt, X, y, 0.4, 5.0)[0])


def test_bf16_autocast_runs_on_the_cpu():
    import genotypes as gt
    from models.augment_cnn import AugmentCNN

    torch.manual_seed(0)
    model = AugmentCNN(8, 1, 4, 10, 3, True, gt.DARTS_V2)
    opt = torch.optim.SGD(model.parameters(), 0.01)
    X, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss, logits = augment.train_step(model, opt, X, y, 0.4, 5.0, amp_dtype=torch.bfloat16)
    assert torch.isfinite(loss) and logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert augment.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(augment.ConfigError, match="--amp fp16 needs a CUDA device"):
        augment.amp_dtype("fp16", torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_on_a_folder(folder, tmp_path):
    root, _ = folder
    res = run_script(
        "search.py", "--name", "f", "--dataset", "folder", "--data_path", root,
        "--image_size", "16", "--epochs", "1", "--layers", "3", "--init_channels", "4",
        "--nodes", "2", "--batch_size", "4", "--workers", "0", "--first_order",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Final genotype = Genotype(" in res.stdout
    assert "skipped" in res.stderr  # the truncated JPEG and notes.txt, named
    config = (tmp_path / "searchs" / "f" / "config.json").read_text()
    assert '"normalize": "0.' in config  # the computed mean and std, in the run's config


@pytest.mark.slow
def test_imagenet_network_on_a_folder_trains_evaluates_and_resumes(folder, tmp_path):
    """The ImageNet path end to end, small: the ImageNet network (--imagenet_stem) at 224 on a
    generated folder; a run killed after its first epoch and resumed ends bit for bit as the
    run never interrupted, and evaluate.py on its checkpoint gives its logged accuracy."""
    import signal

    from test_resume import start, wait_for_first_epoch

    root, _ = folder
    args = ["augment.py", "--dataset", "folder", "--data_path", root, "--imagenet_stem"]
    args += ["--image_size", "224", "--genotype", "DARTS_V2", "--init_channels", "8"]
    args += ["--layers", "5", "--batch_size", "4", "--workers", "0", "--epochs", "2"]
    res = run_script(*args, "--name", "u", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Final test top1 = " in res.stdout
    log = (tmp_path / "augments" / "u" / "augment.log").read_text()
    assert "mult-adds" in log
    uninterrupted = torch.load(
        tmp_path / "augments" / "u" / "checkpoint.pth.tar", weights_only=True
    )

    proc = start([*args, "--name", "r"], tmp_path)
    log_dir = tmp_path / "augments" / "r"
    wait_for_first_epoch(proc, tmp_path, "augment.py", log_dir / "augment.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run_script(*args, "--name", "r", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resumed = torch.load(log_dir / "checkpoint.pth.tar", weights_only=True)
    assert resumed["epoch"] == 2 and "stem0.0.weight" in resumed["model"]
    for k, v in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][k], v), k

    res = run_script(
        "evaluate.py", "--checkpoint", str(log_dir / "checkpoint.pth.tar"), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    top1 = float(res.stdout.split("top1 ")[1].split("%")[0]) / 100
    assert top1 == pytest.approx(resumed["history"][-1]["test_top1"], abs=5e-5)
