"""Out-of-memory back-off: GPT.forward raises torch.OutOfMemoryError (as CUDA would) from a chosen micro-step
on, for micro-batches above a size; train_single.main runs unchanged (utils/train/guard.py, utils/train/oom.py)."""

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import train_single
from conftest import tb_runs, tiny_overrides
from helpers.fault_rank import RaiseInBackward
from models.transformer import GPT
from utils.checkpoint.format import load_checkpoint
from utils.train.oom import smaller_micro_batch


@given(st.integers(min_value=1, max_value=4096))
def test_the_smaller_micro_batch_divides_the_old_one(b):
    """The new micro-batch divides the old (the global batch is kept) and is at most half of it; none below 1."""
    new = smaller_micro_batch(b)
    assert new is None if b == 1 else (b % new == 0 and new <= b // 2 and (b % 2 or new == b // 2))


@pytest.fixture
def oom_above(monkeypatch):
    """oom_above(limit, from_call): training forwards from that call on fail for micro-batches above limit."""
    def install(limit: int, from_call: int = 0) -> None:
        forward, calls = GPT.forward, [0]

        def failing(self, idx, targets=None, pos=0):
            if self.training and targets is not None:
                calls[0] += 1
                if calls[0] > from_call and idx.shape[0] > limit:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
            return forward(self, idx, targets, pos)
        monkeypatch.setattr(GPT, "forward", failing)
    return install


def weights(run_dir):
    return load_checkpoint(run_dir / "ckpt" / "last_checkpoint.pt")["model"]


def test_backed_off_run_ends_like_an_unbroken_run_at_the_smaller_micro_batch(tiny_data, tmp_path, oom_above, capsys):
    """Micro-batch 8 runs out of memory at micro-step 7 (step 8): 8 -> 4 -> 2, accumulation 1 -> 4, one line each;
    the weights match a run at micro-batch 2 x 4 throughout (fp32, 1e-5); the checkpoint's trainer state records
    2 x 4 (config.yaml is not rewritten), and a resume with the original settings takes them up."""
    common = dict(train__max_steps=12, train__eval_every=0, train__save_every=0, model__dropout=0.0)
    assert train_single.main(tiny_overrides(tiny_data, tmp_path / "small", train__batch_size=2,
                                            train__grad_accum_steps=4, **common)) == 0
    oom_above(2, from_call=7)
    big = tiny_overrides(tiny_data, tmp_path / "big", train__batch_size=8, **common)
    assert train_single.main(big) == 0
    out = capsys.readouterr().out
    assert out.count("health: step 8: oom") == 2 and "train.batch_size=2 x train.grad_accum_steps=4" in out
    (tb,) = tb_runs(tmp_path / "big" / "logs")
    assert [e.step for e in tb.Scalars("health/event")] == [8, 8]
    for name, tensor in weights(tmp_path / "small").items():
        assert torch.allclose(tensor, weights(tmp_path / "big")[name], atol=1e-5), name
    # the micro-batch is run state, in the checkpoint; config.yaml stays what the user asked for
    recorded = yaml.safe_load((tmp_path / "big" / "ckpt" / "config.yaml").read_text())["train"]
    saved = load_checkpoint(tmp_path / "big" / "ckpt" / "last_checkpoint.pt")
    assert (recorded["batch_size"], recorded["grad_accum_steps"]) == (8, 1)
    assert saved["trainer"]["micro_batch"] == [2, 4]
    assert train_single.main([*big, "train.max_steps=14", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "resuming with train.batch_size=2 and train.grad_accum_steps=4" in out and "oom" not in out


def test_out_of_memory_at_micro_batch_1_stops_with_one_line(tiny_data, tmp_path, oom_above, capsys):
    """Out of memory at every size: back off to 1, then one error line, exit 2, no traceback."""
    oom_above(0)
    assert train_single.main(tiny_overrides(tiny_data, tmp_path, train__batch_size=4)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory at step 1 with train.batch_size=1 (micro-batch 1 cannot be smaller)")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_out_of_memory_in_the_backward_backs_off_as_in_the_forward(tiny_data, tmp_path, monkeypatch, capsys):
    """The backward of micro-batches above 2 runs out of memory from step 3 on (one process): the same back-off,
    and the weights of the unbroken 2 x 4 run."""
    common = dict(train__max_steps=6, train__eval_every=0, train__save_every=0, model__dropout=0.0)
    assert train_single.main(tiny_overrides(tiny_data, tmp_path / "small", train__batch_size=2,
                                            train__grad_accum_steps=4, **common)) == 0
    forward, calls = GPT.forward, [0]

    def failing(self, idx, targets=None, pos=0):
        logits, loss = forward(self, idx, targets, pos)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] > 2 and idx.shape[0] > 2:
                loss = RaiseInBackward.apply(loss)
        return logits, loss
    monkeypatch.setattr(GPT, "forward", failing)
    assert train_single.main(tiny_overrides(tiny_data, tmp_path / "big", train__batch_size=8, **common)) == 0
    assert capsys.readouterr().out.count("health: step 3: oom") == 2
    for name, tensor in weights(tmp_path / "small").items():
        assert torch.allclose(tensor, weights(tmp_path / "big")[name], atol=1e-5), name
