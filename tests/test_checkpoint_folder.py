"""The Checkpointer over generated folder states: whatever is in the folder (valid, truncated, empty,
random or stray files, a missing or broken last link), no start decision and no sequence of saves
ever deletes or overwrites the newest loadable checkpoint or best_model.pt."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.checkpoint import format as ckpt
from utils.checkpoint.format import CheckpointError
from models.config import Config
from models.config_loader import config_to_dict
from utils.checkpoint.folder import BEST, CONFIG_FILE, LAST, STEP_FILE, Checkpointer
from utils.distributed.process_group import DistInfo

CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)


FULL_CONFIG = config_to_dict(Config())  # a checkpoint's config has every section (a partial one is refused)


def extra(step: int) -> dict:
    return {ckpt.CONFIG: FULL_CONFIG, ckpt.FORMAT: ckpt.FORMAT_VERSION, ckpt.TRAINER: {"step": step}}


def state(step: int) -> dict:
    return {ckpt.MODEL: {"w": torch.full((2,), float(step))}, **extra(step)}


MODEL = torch.nn.Linear(2, 1)
OPTIMIZER = torch.optim.SGD(MODEL.parameters(), lr=0.1)


def write(path: Path, kind: str, step: int) -> None:
    if kind == "valid":
        ckpt.save_checkpoint(state(step), path)
    elif kind == "truncated":
        ckpt.save_checkpoint(state(step), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(bytes(range(step % 200, step % 200 + 50)))


KINDS = st.sampled_from(["valid", "truncated", "empty", "garbage"])
NAMES = st.one_of(st.integers(1, 40).map(lambda s: f"step_{s:07d}.pt"),
                  st.sampled_from([LAST, BEST, CONFIG_FILE, "step_12.pt", "step_abc.pt", "notes.txt",
                                   ".step_0000003.pt.x.tmp"]))
FOLDERS = st.lists(st.tuples(NAMES, KINDS, st.integers(1, 40)), max_size=7, unique_by=lambda f: f[0])


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def loadable_steps(d: Path) -> list[int]:
    steps = []
    for s, p in Checkpointer(d, 1, CPU).step_files():
        try:
            ckpt.load_checkpoint(p)
            steps.append(s)
        except CheckpointError:
            pass
    return steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=FOLDERS, resume=st.sampled_from([None, "auto"]), keep_last=st.integers(1, 3), saves=st.integers(0, 4))
def test_no_start_or_save_loses_the_newest_loadable_checkpoint(files, resume, keep_last, saves):
    """Refusing changes nothing; resuming then saving never removes the newest loadable file or best."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, kind, step in files:
            m = STEP_FILE.fullmatch(name)  # a step file's content matches its name
            write(d / name, kind, int(m.group(1)) if m else step)
        before = snapshot(d)
        newest = max(loadable_steps(d), default=0)
        try:
            last_step = ckpt.load_checkpoint(d / LAST)[ckpt.TRAINER]["step"]
        except CheckpointError:
            last_step = 0
        checkpointer = Checkpointer(d, keep_last, CPU)
        checkpointer.claim()
        try:
            found = checkpointer.find_resume(resume, warn=lambda msg: None)
        except CheckpointError:
            checkpointer.release()
            assert snapshot(d) == before  # a refused start writes nothing
            return
        if found is None:  # a fresh start is only taken where it cannot overwrite a run's files
            assert not [n for n in before if n in (LAST, BEST) or n.startswith("step_")]
            start = 0
        else:
            start = found[1][ckpt.TRAINER]["step"]
            assert start >= max(newest, last_step)  # the newest loadable checkpoint is the one resumed
        checkpointer.accept("model: {}\n")
        for step in range(start + 1, start + 1 + saves):
            checkpointer.save(MODEL, OPTIMIZER, extra(step), step)
            after = snapshot(d)
            assert max(loadable_steps(d)) == step
            if newest and step - newest < keep_last:
                assert before[f"step_{newest:07d}.pt"] == after[f"step_{newest:07d}.pt"]
            assert before.get(BEST) == after.get(BEST)
            for name, content in before.items():  # nothing newer than this save is touched
                m = STEP_FILE.fullmatch(name)
                if m and int(m.group(1)) > step:
                    assert after[name] == content
            assert ckpt.load_checkpoint(d / LAST)[ckpt.TRAINER]["step"] == step
        checkpointer.release()
