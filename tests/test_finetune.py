"""Fine-tuning (train.init_from) in real processes: a new run at step 0 from the weights of a file or a
sharded folder, on 2 FSDP ranks or 1 process, its model section taken from the checkpoint; a model that
differs is refused before anything is written; --resume auto continues the fine-tune, not its start."""

import shutil
from pathlib import Path

import pytest
import torch

import train_single
from conftest import TINY_TEXT, make_dataset, run_script, run_torchrun, tiny_overrides
from models.config import Config, ModelConfig
from models.config_loader import config_from_dict, config_to_dict, load_config
from models.transformer import GPT
from utils.checkpoint.format import CONFIG, FORMAT, FORMAT_VERSION, MODEL, TRAINER, CheckpointError, save_checkpoint
from utils.checkpoint.reader import load_weights
from utils.train.finetune import model_base

SOURCE = "source/ckpt/step_0000003.pt"  # a 3-step run of the tiny model, one process
SHARDED = "fsdp/ckpt/step_0000001"  # the fine-tune of SOURCE on 2 FSDP ranks


def fine_tune(runs: Path, name: str, init: str | Path, *extra: str, **values) -> list[str]:
    """The tiny run's overrides less its model.* ones (the checkpoint's model is the run's), from init."""
    tiny = tiny_overrides(runs / "data", runs / name, train__init_from=init, **values)
    return [o for o in tiny if not o.startswith("model.")] + list(extra)


def one_step(runs: Path, name: str, init: str | Path, *extra: str) -> list[str]:
    """One step at an LR of 1e-9: Adam moves each weight by at most ~1e-9, so it ends where it started."""
    return fine_tune(runs, name, init, *extra, train__max_steps=1, train__lr=1e-9, train__min_lr=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """SOURCE, its fine-tune on 2 FSDP ranks (SHARDED), and that folder's fine-tunes on 2 FSDP ranks and in
    one process."""
    tmp = tmp_path_factory.mktemp("finetune")
    make_dataset(tmp / "data", TINY_TEXT[:1400])
    run_script("train_single.py", "--device", "cpu",
               *tiny_overrides(tmp / "data", tmp / "source", train__max_steps=3), check=True)
    for name, init in (("fsdp", SOURCE), ("fsdp_from_folder", SHARDED)):
        run_torchrun(2, "train_ddp.py", "--device", "cpu",
                     *one_step(tmp, name, tmp / init, "distributed.strategy=fsdp", "train.batch_size=2"), check=True)
    run_script("train_single.py", "--device", "cpu", *one_step(tmp, "one", tmp / SHARDED, "model.dropout=0.1"),
               check=True)
    return tmp


def assert_starts_from(tuned: dict, source: dict[str, torch.Tensor]) -> None:
    """tuned (a checkpoint after one_step) holds source's weights, which are far from where train.seed
    alone would have started it: the check fails if init_from were ignored."""
    cfg = config_from_dict(tuned[CONFIG])
    fresh = GPT(cfg.model, seed=cfg.train.seed).state_dict()
    assert tuned[MODEL].keys() == source.keys() and tuned[TRAINER]["step"] == 1
    assert max((tuned[MODEL][k] - source[k]).abs().max().item() for k in source) < 1e-7
    assert max((fresh[k] - source[k]).abs().max().item() for k in source) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name, init", [("fsdp", SOURCE), ("fsdp_from_folder", SHARDED)], ids=["file", "folder"])
def test_fsdp_fine_tune_starts_from_a_file_or_folder(runs, name, init):
    """2 FSDP ranks from a single-file checkpoint (each copies its part) or a sharded folder (each reads its
    part): every rank's shard starts from its weights; the model section (no model.* given) and init_from
    are the run's config."""
    tuned = load_weights(runs / name / "ckpt/step_0000001")
    assert_starts_from(tuned, load_weights(runs / init)[MODEL])
    assert tuned[CONFIG]["train"]["init_from"] == str(runs / init)
    assert tuned[CONFIG]["model"] == load_weights(runs / init)[CONFIG]["model"]


@pytest.mark.slow
def test_one_process_fine_tune_starts_from_a_sharded_folder(runs):
    """1 process from the folder 2 FSDP ranks saved starts from its weights; model.dropout may change."""
    tuned = load_weights(runs / "one/ckpt/step_0000001.pt")
    assert_starts_from(tuned, load_weights(runs / SHARDED)[MODEL])
    assert tuned[CONFIG]["model"]["dropout"] == 0.1
    assert "init_from: " + str(runs / SHARDED) in (runs / "one/ckpt/config.yaml").read_text()


@pytest.mark.parametrize("given", ["override", "config file"])
def test_a_model_change_is_refused_before_anything_is_written(capsys, tiny_data, tmp_path, given):
    """model.n_layers other than the checkpoint's, on the command line or in the file: one line, exit 2,
    checkpoint.dir never created."""
    cfg = Config(model=ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, context_length=32))
    source = tmp_path / "source.pt"
    save_checkpoint({MODEL: GPT(cfg.model).state_dict(), CONFIG: config_to_dict(cfg), FORMAT: FORMAT_VERSION}, source)
    args = fine_tune(tmp_path, "run", source)
    if given == "override":
        args.append("model.n_layers=3")
    else:
        (tmp_path / "c.yaml").write_text("model:\n  n_layers: 3\n")
        args = ["--config", str(tmp_path / "c.yaml"), *args]
    code = train_single.main(["--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"error: train.init_from={source} holds another model")
    assert "model.n_layers: checkpoint 2 vs config 3" in err
    assert not (tmp_path / "run").exists()


def test_the_checkpoints_model_section_lies_beneath_the_file_and_overrides(tmp_path):
    """load_config's base: a key the file or an override gives wins, every other one is the base's."""
    (tmp_path / "c.yaml").write_text("model:\n  dim: 64\n")
    cfg = load_config(tmp_path / "c.yaml", ["model.dropout=0.1"], base={"model": {"dim": 32, "n_layers": 3}})
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.dropout, cfg.model.n_heads) == (64, 3, 0.1, 8)


@pytest.mark.slow
def test_resume_auto_continues_the_fine_tune(runs):
    """Stopped at step 2 and continued with --resume auto after its init checkpoint was deleted, a fine-tune
    ends bit for bit where the uninterrupted one does: it restores its own checkpoint and model section,
    never reading the init checkpoint again."""
    init = runs / "init_copy.pt"
    shutil.copy(runs / SOURCE, init)

    def args(name: str, source: Path) -> list[str]:
        return fine_tune(runs, name, source, train__max_steps=4)

    run_script("train_single.py", "--device", "cpu", *args("whole", runs / SOURCE), check=True)
    run_script("train_single.py", "--device", "cpu", *args("stopped", init), "train.stop_at_step=2", check=True)
    init.unlink()
    resumed = run_script("train_single.py", "--device", "cpu", "--resume", "auto", *args("stopped", init), check=True)
    assert "resumed from" in resumed.stdout and "fine-tuning from" not in resumed.stdout, resumed.stdout
    whole, stopped = (load_weights(runs / name / "ckpt/step_0000004.pt") for name in ("whole", "stopped"))
    assert all(torch.equal(whole[MODEL][k], stopped[MODEL][k]) for k in whole[MODEL])
    assert stopped[TRAINER]["step"] == 4 and stopped[CONFIG]["train"]["init_from"] == str(init)
    assert not torch.equal(stopped[MODEL]["tok_emb.weight"], load_weights(runs / SOURCE)[MODEL]["tok_emb.weight"])


def test_the_model_base_of_a_resume_is_the_runs_own(tiny_run, tmp_path):
    """--resume PATH takes PATH's model section and --resume auto the run's config.yaml: neither reads the
    init checkpoint, which a fresh start needs and names in its error."""
    step, folder = tiny_run / "ckpt/step_0000003.pt", str(tiny_run / "ckpt")
    model = load_weights(step)[CONFIG]["model"]
    gone = str(tmp_path / "deleted.pt")
    assert model_base(gone, str(step), str(tmp_path / "ckpt")) == {"model": model}
    assert model_base(gone, "auto", folder) == {"model": model}
    with pytest.raises(CheckpointError, match="train.init_from: checkpoint not found"):
        model_base(gone, None, folder)
    with pytest.raises(CheckpointError, match="--resume: checkpoint not found"):
        model_base(str(step), gone, folder)
