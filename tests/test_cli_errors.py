"""Bad input: one clear line on stderr (what is wrong, how to fix it), exit 2, no traceback, nothing lost."""

import shutil

import pytest

import inference
import train_single
from conftest import make_dataset, tiny_overrides


def fails_with(capsys, main, argv, *fragments) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def trained(tiny_run, tmp_path):
    """A copy of a finished tiny run: (data dir, run dir)."""
    shutil.copytree(tiny_run, tmp_path / "run", symlinks=True)
    return tmp_path / "run/data", tmp_path / "run"


def test_missing_config_file(capsys, tmp_path):
    """A config path that does not exist."""
    fails_with(capsys, train_single.main, ["--config", tmp_path / "nope.yaml"], "config file not found")


def test_malformed_config_file(capsys, tmp_path):
    """A YAML syntax error names the file and line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    fails_with(capsys, train_single.main, ["--config", bad], "is not valid YAML", "line")


@pytest.mark.parametrize("text, key, line", [("model:\n  dim: 32\nmodel:\n  n_layers: 2\n", "model", 3),
                                             ("train:\n  seed: 1\n  seed: 2\n", "seed", 3)])
def test_a_key_given_twice_is_refused(capsys, tmp_path, text, key, line):
    """Plain YAML keeps the last of two equal keys, which would drop a whole first section in silence."""
    dup = tmp_path / "dup.yaml"
    dup.write_text(text)
    fails_with(capsys, train_single.main, ["--config", dup], f"at line {line}: '{key}' appears twice")


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=abc", "train.batch_size must be int"),
    ("model.n_heads=3", "must divide model.dim"),
    ("optim.lr=-0.1", "optim.lr must be positive"),
    ("trian.lr=0.1", "did you mean 'optim.lr'"),
])
def test_wrong_type_or_impossible_value(capsys, tiny_data, tmp_path, override, fragment):
    """Type and range errors are caught before anything runs."""
    fails_with(capsys, train_single.main, [*tiny_overrides(tiny_data, tmp_path), override], fragment)


def test_context_longer_than_data(capsys, tmp_path):
    """A context the training split cannot fill says so."""
    data = make_dataset(tmp_path / "d", "short text " * 10, val_fraction=0.5)
    fails_with(capsys, train_single.main, [*tiny_overrides(data, tmp_path, model__context_length=128)],
               "model.context_length=128 is longer than the training split")


def test_batch_larger_than_data(capsys, tiny_data, tmp_path):
    """An impossible global batch for the data names the knobs to lower."""
    fails_with(capsys, train_single.main, [*tiny_overrides(tiny_data, tmp_path, train__batch_size=5000)],
               "fewer than one global batch", "train.batch_size")


def test_dataset_not_prepared(capsys, tmp_path):
    """Training on a folder without a manifest names the command that prepares it."""
    fails_with(capsys, train_single.main, tiny_overrides(tmp_path / "nothing", tmp_path),
               "dataset not prepared", "python -m data.prepare_dataset --out")


def test_empty_split_file(capsys, tiny_data, tmp_path):
    """An emptied shard (e.g. a failed copy) is reported, not trained on."""
    (tiny_data / "train-00000.bin").write_bytes(b"")
    fails_with(capsys, train_single.main, tiny_overrides(tiny_data, tmp_path), "train-00000.bin holds 0 bytes")


def test_missing_resume_checkpoint(capsys, tiny_data, tmp_path):
    """--resume with a path that does not exist."""
    fails_with(capsys, train_single.main, ["--resume", tmp_path / "x.pt", *tiny_overrides(tiny_data, tmp_path)],
               "checkpoint not found")


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a readable checkpoint"),
    (lambda p: p.write_text("hello"), "not a readable checkpoint"),
])
def test_damaged_checkpoint(capsys, trained, damage, fragment):
    """A truncated file or a non-checkpoint is refused by training and by inference."""
    data, run = trained
    path = run / "ckpt/step_0000003.pt"
    damage(path)
    fails_with(capsys, train_single.main, ["--resume", path, *tiny_overrides(data, run)], fragment)
    fails_with(capsys, inference.main, ["--checkpoint", path, "--prompt", "a"], fragment)


def test_resume_with_other_model_shape(capsys, trained):
    """Resuming with a different model lists the settings that differ."""
    data, run = trained
    fails_with(capsys, train_single.main, ["--resume", "auto", *tiny_overrides(data, run, model__dim=64,
                                                                            model__n_layers=3)],
               "another model shape", "model.dim: checkpoint 32 vs config 64", "model.n_layers: checkpoint 2 vs config 3")


@pytest.mark.parametrize("optim", [dict(optim__name="muon"), dict(optim__base_width=16)])
def test_resume_with_other_optimizer_groups(capsys, trained, optim):
    """A checkpoint's optimizer state fits only the parameter groups it was saved with: another optimizer, or
    base_width switched on, is one line naming the saved settings and the way to keep the weights."""
    data, run = trained
    fails_with(capsys, train_single.main, ["--resume", "auto", *tiny_overrides(data, run, **optim)],
               "was trained with optim.name=adamw optim.base_width=0", "train.init_from=")


def test_existing_run_is_never_overwritten(capsys, trained):
    """Starting a new run where checkpoints exist refuses, and the files are untouched."""
    data, run = trained
    before = {p.name: p.stat().st_mtime_ns for p in (run / "ckpt").iterdir()}
    fails_with(capsys, train_single.main, tiny_overrides(data, run), "already holds a run", "--resume auto")
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "ckpt").iterdir()}


def test_cuda_requested_but_absent(capsys, tiny_data, tmp_path):
    """--device cuda on a machine without a GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails_with(capsys, train_single.main, ["--device", "cuda", *tiny_overrides(tiny_data, tmp_path)],
               "no CUDA GPU is visible", "--device cpu")
    fails_with(capsys, inference.main, ["--device", "cuda", "--prompt", "a"], "no CUDA GPU is visible")


def test_empty_prompt(capsys, trained):
    """An empty prompt says how to give one."""
    _, run = trained
    fails_with(capsys, inference.main, ["--checkpoint", run / "ckpt/best_model.pt", "--prompt", ""],
               "the prompt is empty")


def test_output_folder_not_writable(capsys, tiny_data, tmp_path):
    """A checkpoint or log folder that cannot be created or written is named with the key to change."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails_with(capsys, train_single.main, tiny_overrides(tiny_data, tmp_path) + [f"checkpoint.dir={blocker}/c"],
               "cannot be written", "checkpoint.dir")
    fails_with(capsys, train_single.main, tiny_overrides(tiny_data, tmp_path) + [f"logging.dir={blocker}/l"],
               "cannot be written", "logging.dir")
