"""Checkpoints and datasets that prove their integrity: a flipped bit, a missing or cut shard, a folder or a
file that only looks like a checkpoint, a hand-edited manifest. Every loader refuses them in one line
naming the file, `--resume auto` falls back to the newest sound checkpoint, and every loader reads a
sharded folder as it reads a file."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inference
import train_single
from conftest import make_dataset, run_script, run_torchrun, tiny_overrides
from data.prepare_dataset import prepare
from data.shards import DataError, read_manifest
from scripts import convert_checkpoint, evaluate, export_hf
from utils.checkpoint.folder import Checkpointer
from utils.checkpoint.format import CheckpointError, load_checkpoint
from utils.checkpoint.reader import load_weights
from utils.checkpoint.sharded import CHECKSUMS, EXTRA, METADATA
from utils.distributed.process_group import DistInfo

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RUN = dict(train__max_steps=4, checkpoint__every=2, eval__every=2, checkpoint__keep_last=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A one-process run and a 2-rank FSDP run, each with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("integrity")
    data = make_dataset(tmp / "data")
    run_script("train_single.py", *tiny_overrides(data, tmp / "file", **RUN), check=True)
    run_torchrun(2, "train_ddp.py", "--device", "cpu", "distributed.strategy=fsdp",
                 *tiny_overrides(data, tmp / "sharded", **RUN), check=True)
    return tmp


def flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def tensor_data_offset(path: Path, entry: int, fraction: float) -> int:
    """A byte inside the data of one of the file's tensors (zip entries archive/data/N)."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename and i.file_size]
        info = infos[entry % len(infos)]
    with open(path, "rb") as f:  # the local header's own lengths (they may differ from the central directory's)
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + int(fraction * (info.file_size - 1))


def checkpointer(folder: Path, sharded: bool) -> Checkpointer:
    return Checkpointer(folder, 3, DistInfo(0, 0, 1, torch.device("cpu"), None), sharded=sharded)


@pytest.mark.slow  # its fixture trains twice, once under torchrun
@SETTINGS
@given(entry=st.integers(0, 50), fraction=st.floats(0, 1), bit=st.integers(0, 7))
def test_a_flipped_bit_in_a_file_is_refused_and_resume_falls_back(runs, tmp_path_factory, entry, fraction, bit):
    ckpt = tmp_path_factory.mktemp("flipped") / "ckpt"
    shutil.copytree(runs / "file/ckpt", ckpt)
    newest = ckpt / "step_0000004.pt"
    (ckpt / "last_checkpoint.pt").unlink()  # it is the same file as step 4: the fallback is step 2
    flip_bit(newest, tensor_data_offset(newest, entry, fraction), bit)
    with pytest.raises(CheckpointError, match=r"step_0000004.pt is damaged: its entry \S+ fails its CRC-32 check"):
        load_checkpoint(newest)
    warnings: list[str] = []
    found = checkpointer(ckpt, sharded=False).find_resume("auto", warn=warnings.append)
    assert found[0].name == "step_0000002.pt" and "step_0000004.pt is damaged" in warnings[0]


def damage_folder(folder: Path, kind: str, where: float) -> str:
    """Damage a sharded checkpoint folder; returns the file name the refusal must name."""
    shards = sorted(folder.glob("*.distcp"))
    shard = shards[int(where * len(shards)) % len(shards)]
    if kind == "missing shard":
        shard.unlink()
    elif kind == "cut shard":
        shard.write_bytes(shard.read_bytes()[: int(where * shard.stat().st_size)])
    elif kind == "flipped bit in a shard":
        flip_bit(shard, int(where * (shard.stat().st_size - 1)), 3)
    elif kind == "flipped bit in the metadata":
        flip_bit(folder / METADATA, int(where * ((folder / METADATA).stat().st_size - 1)), 0)
        return METADATA
    else:  # "missing checksums" / "missing extra.pt"
        name = CHECKSUMS if kind == "missing checksums" else EXTRA
        (folder / name).unlink()
        return name
    return shard.name


DAMAGE = st.sampled_from(["missing shard", "cut shard", "flipped bit in a shard", "flipped bit in the metadata",
                          "missing checksums", "missing extra.pt"])


@pytest.mark.slow  # its fixture trains twice, once under torchrun
@SETTINGS
@given(kind=DAMAGE, where=st.floats(0, 0.999))
def test_a_damaged_sharded_folder_is_refused_naming_the_file_and_resume_falls_back(runs, tmp_path_factory, kind,
                                                                                   where):
    ckpt = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree(runs / "sharded/ckpt", ckpt)
    named = damage_folder(ckpt / "step_0000004", kind, where)
    with pytest.raises(CheckpointError) as refused:
        load_weights(ckpt / "step_0000004")
    message = str(refused.value)
    assert "\n" not in message and "step_0000004" in message
    assert named in message or (kind == "flipped bit in the metadata" and "unreadable" in message), message
    warnings: list[str] = []
    found = checkpointer(ckpt, sharded=True).find_resume("auto", warn=warnings.append)
    assert found[0].name == "step_0000002" and "step_0000004" in warnings[0]


def loader_argv(loader: str, checkpoint: Path, out: Path) -> tuple:
    """(main, argv) of every command that loads a checkpoint."""
    return {
        "inference": (inference.main, ["--checkpoint", checkpoint, "--prompt", "ab", "--max-new-tokens", "4"]),
        "evaluate": (evaluate.main, ["--checkpoint", checkpoint, "--text-file", __file__, "--max-bytes", "2000"]),
        "convert": (convert_checkpoint.main, ["--checkpoint", checkpoint, "--out", out / "converted.pt"]),
        "export": (export_hf.main, ["--checkpoint", checkpoint, "--out", out / "hf"]),
    }[loader]


LOADERS = ["inference", "evaluate", "convert", "export"]


@pytest.mark.slow  # its fixture trains twice, once under torchrun
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("source", ["file/ckpt/step_0000004.pt", "sharded/ckpt/step_0000004"])
def test_every_loader_reads_a_file_or_a_sharded_folder(runs, tmp_path, capsys, loader, source):
    main, argv = loader_argv(loader, runs / source, tmp_path)
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err


@pytest.mark.slow  # its fixture trains twice, once under torchrun
def test_converting_onto_a_folder_is_refused_in_one_line(runs, tmp_path, capsys):
    code = convert_checkpoint.main(["--checkpoint", str(runs / "file/ckpt/step_0000004.pt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --out {tmp_path} is a folder; name the file to write, e.g. --out " \
                                f"{tmp_path / 'model.pt'}", err
    assert list(tmp_path.iterdir()) == []


def looks_like_a_checkpoint(runs: Path, tmp: Path, kind: str) -> Path:
    if kind == "metadata beside unrelated files":
        (tmp / "fake").mkdir()
        shutil.copy(runs / "sharded/ckpt/step_0000004" / METADATA, tmp / "fake" / METADATA)
        (tmp / "fake/notes.txt").write_text("not a shard")
        return tmp / "fake"
    if kind == "extra without a config":
        shutil.copytree(runs / "sharded/ckpt/step_0000004", tmp / "fake")
        torch.save({"format_version": 2, "trainer": {}}, tmp / "fake" / EXTRA)
        return tmp / "fake"
    state = torch.load(runs / "file/ckpt/step_0000004.pt", weights_only=True)
    state["config"] = {k: v for k, v in state["config"].items() if k in ("model", "train")}
    torch.save(state, tmp / "partial.pt")
    return tmp / "partial.pt"


@pytest.mark.slow  # its fixture trains twice, once under torchrun
@pytest.mark.parametrize("loader", LOADERS + ["resume"])
@pytest.mark.parametrize("kind", ["metadata beside unrelated files", "extra without a config", "partial config"])
def test_what_only_looks_like_a_checkpoint_is_refused_in_one_line_by_every_loader(runs, tmp_path, capsys, loader,
                                                                                  kind):
    fake = looks_like_a_checkpoint(runs, tmp_path, kind)
    if loader == "resume":
        fsdp = ["distributed.strategy=fsdp"] if fake.is_dir() else []
        code = train_single.main(["--resume", str(fake), *fsdp, *tiny_overrides(runs / "data", tmp_path / "run")])
    else:
        main, argv = loader_argv(loader, fake, tmp_path)
        code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ") and fake.name in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf").exists()


def edit_manifest(manifest: dict, edit: str, value: object) -> dict:
    if edit == "drop a split":
        del manifest["splits"][value if isinstance(value, str) and value in manifest["splits"] else "val"]
    elif edit == "a size of another type":
        manifest["splits"]["train"][0]["bytes"] = value
    elif edit == "a shard named by a path":
        manifest["splits"]["train"][0]["file"] = f"../{value}"
    else:  # "a total that is not the sum"
        manifest["train_bytes"] = value
    return manifest


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=st.sampled_from(["drop a split", "a size of another type", "a shard named by a path",
                             "a total that is not the sum"]),
       value=st.one_of(st.sampled_from(["train", "val", "test"]), st.text(max_size=5), st.floats(allow_nan=True),
                       st.booleans(), st.none(), st.integers(-5, -1), st.lists(st.integers(), max_size=2)))
def test_a_hand_edited_manifest_is_one_line_and_preparing_again_mends_it(tmp_path_factory, edit, value):
    data = make_dataset(tmp_path_factory.mktemp("manifest") / "data")
    path = data / "manifest.json"
    path.write_text(json.dumps(edit_manifest(json.loads(path.read_text()), edit, value)))
    with pytest.raises(DataError) as refused:
        read_manifest(data)
    assert "\n" not in str(refused.value) and "prepare the dataset again" in str(refused.value)
    prepare(data, [b"the same text, prepared again. " * 200], ["tests"], 0.1)  # what the message tells the user
    assert read_manifest(data)["train_bytes"] > 0
