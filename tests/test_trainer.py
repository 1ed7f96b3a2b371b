"""The training step and schedule: formulas, accumulation, overfitting, precisions, non-finite guard, options."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import tiny_overrides
from models.config_loader import load_config
from utils.distributed.process_group import DistInfo
from utils.metrics.logger import MetricsLogger
from utils.train.optim import Muon, build_optimizer, lr_at, newton_schulz, stacks
from utils.train.run import agree_precision, build_trainer, load_data, resolved
from utils.train.health import TrainingDiverged
from utils.train.trainer import Trainer

CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)


def make_trainer(data_dir, tmp_path, **overrides) -> Trainer:
    cfg = load_config(None, tiny_overrides(data_dir, tmp_path, **overrides))
    precision = agree_precision(cfg, CPU, None)
    cfg = resolved(cfg, precision, steps_per_epoch=0)
    plan, val_data = load_data(cfg, CPU)
    return build_trainer(cfg, precision, CPU, plan, val_data, MetricsLogger(tmp_path, is_main=False))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedule_matches_formula(schedule):
    """Linear warmup to lr, then cosine (or constant + linear cooldown) down to min_lr."""
    cfg = load_config(None, ["optim.lr=1.0", "schedule.min_lr=0.1", "schedule.warmup_steps=10", "train.max_steps=110",
                             f"schedule.name={schedule}", "schedule.cooldown_frac=0.5"])
    lr = lambda step: lr_at(step, cfg.schedule, cfg.optim.lr, cfg.train.max_steps)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    if schedule == "cosine":
        for s in (10, 35, 60, 85, 110):
            assert lr(s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 100)))
    else:
        assert lr(30) == lr(54) == pytest.approx(1.0)  # stable until step 55
        for s in (55, 80, 110):
            assert lr(s) == pytest.approx(1.0 - 0.9 * (s - 55) / 55)


def test_accumulation_equals_one_large_batch(tiny_data, tmp_path):
    """k micro-batches of B give the same update as one batch of k*B (fp32)."""
    big = make_trainer(tiny_data, tmp_path / "a", train__batch_size=8, train__grad_accum_steps=1)
    small = make_trainer(tiny_data, tmp_path / "b", train__batch_size=2, train__grad_accum_steps=4)
    for _ in range(3):
        loss_big, norm_big, _ = big.train_step()
        loss_small, norm_small, _ = small.train_step()
        assert loss_big == pytest.approx(loss_small, rel=1e-5) and norm_big == pytest.approx(norm_small, rel=1e-4)
    for (name, a), b in zip(big.raw.named_parameters(), small.raw.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_model_overfits_tiny_corpus(tiny_data, tmp_path, precision):
    """The loss falls clearly within 60 steps, in fp32 and in bf16 autocast."""
    trainer = make_trainer(tiny_data, tmp_path, train__precision=precision, train__max_steps=60,
                           optim__lr=3e-3, schedule__warmup_steps=5)
    losses = [trainer.train_step()[0] for _ in range(60)]
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < 2.8, losses[::10]


def test_non_finite_gradient_skips_the_update(tiny_data, tmp_path):
    """A NaN gradient leaves the weights untouched and is counted; training then continues."""
    trainer = make_trainer(tiny_data, tmp_path)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.raw.state_dict().items()}
    hook = trainer.raw.blocks[0].mlp.fc.weight.register_hook(lambda g: g * float("nan"))
    _, norm, applied = trainer.train_step()
    hook.remove()
    assert not applied and math.isnan(norm) and trainer.skipped_steps == 1 and trainer.step == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.raw.state_dict().items())
    assert trainer.train_step()[2] and trainer.guard.streak == 0


def test_repeated_non_finite_steps_stop_the_run(tiny_data, tmp_path):
    """health.max_consecutive non-finite steps in a row raise TrainingDiverged with the fix in the message; the old
    key train.max_nonfinite_steps still sets it."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_nonfinite_steps=2)
    trainer.raw.blocks[0].mlp.fc.weight.register_hook(lambda g: g * float("inf"))
    trainer.train_step()
    with pytest.raises(TrainingDiverged, match="non-finite for 2 steps in a row.*lower optim.lr"):
        trainer.train_step()


OPTIONS = [
    {"model__pos_emb": "rope"}, {"model__norm": "rmsnorm"}, {"model__qk_norm": "true"},
    {"model__activation": "relu2"}, {"model__activation": "swiglu"}, {"model__zero_init_proj": "true"},
    {"model__tie_embeddings": "false"}, {"model__bias": "false"}, {"model__dropout": 0.1},
    {"optim__name": "muon", "optim__muon_lr": 0.02}, {"schedule__name": "wsd"},
    {"train__activation_checkpointing": "true"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_trains(tiny_data, tmp_path, options):
    """Each model and optimizer option trains a tiny model with falling loss."""
    trainer = make_trainer(tiny_data, tmp_path, train__max_steps=30, optim__lr=3e-3, **options)
    losses = [trainer.train_step()[0] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses[::5]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.bfloat16)])
def test_muon_orthogonalises_in_the_runs_precision(precision, dtype):
    """An fp32 run never pays for bf16 matmuls in the optimizer (several times slower on CPUs without bf16 units)."""
    from models.config import ModelConfig, OptimConfig
    from models.transformer import GPT

    model = GPT(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, context_length=16))
    assert build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"), precision).ns_dtype == dtype


@settings(max_examples=10, deadline=None)
@given(dim=st.sampled_from([32, 64, 96]), base_width=st.sampled_from([16, 32, 128]), fused=st.booleans())
def test_base_width_scales_the_adamw_rate_of_the_blocks_matrices_only(dim, base_width, fused):
    """optim.base_width: Adam's first step moves each element by its group's rate (m / sqrt(v) = +-1), so every
    element of a block's matrix moves by lr x base_width / dim, every embedding or gain element by lr, also after
    the scheduler has scaled both."""
    from models.config import ModelConfig, OptimConfig, ScheduleConfig
    from models.transformer import GPT
    from utils.train.optim import build_scheduler

    model = GPT(ModelConfig(dim=dim, n_layers=2, n_heads=2, ffn_dim=2 * dim, context_length=16))
    lr = 1e-2
    opt = build_optimizer(model, OptimConfig(lr=lr, base_width=base_width, weight_decay=0.0, fused=fused),
                          torch.device("cpu"))
    scheduler = build_scheduler(opt, ScheduleConfig(warmup_steps=4), lr, max_steps=100)  # step 0: lr / 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))[1].backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()[p.grad.abs() > 1e-4]  # where Adam's eps does not count
        rate = lr / 4 * (base_width / dim if name.startswith("blocks.") and p.dim() == 2 else 1)
        torch.testing.assert_close(moved, torch.full_like(moved, rate), rtol=2e-3, atol=0, msg=name)
    assert scheduler.get_last_lr()[0] == pytest.approx(lr / 4 * base_width / dim)


def test_base_width_belongs_to_adamw():
    """Under Muon the blocks' matrices have no AdamW rate to scale: refused, with the fix."""
    with pytest.raises(Exception, match="optim.base_width=0 or optim.name=adamw"):
        load_config(None, ["optim.name=muon", "optim.base_width=128"])


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 4), rows=st.integers(2, 40), cols=st.integers(2, 40), seed=st.integers(0, 2 ** 16))
def test_newton_schulz_of_a_stack_is_each_matrix_on_its_own(count, rows, cols, seed):
    """Muon orthogonalises same-shaped matrices as one stack; each comes out as if alone."""
    stack = torch.randn(count, rows, cols, generator=torch.Generator().manual_seed(seed))
    together = newton_schulz(stack, dtype=torch.float32)
    for g, o in zip(stack, together):
        torch.testing.assert_close(o, newton_schulz(g, dtype=torch.float32), rtol=1e-5, atol=1e-5)


@given(shapes=st.lists(st.sampled_from([(8, 6), (6, 8), (3, 3), (40, 40)]), max_size=12), cap=st.integers(1, 5000))
def test_stacks_hold_same_shaped_matrices_within_the_cap(shapes, cap):
    """Every matrix in exactly one stack of its own shape, none over the cap unless it is alone: under FSDP a
    rank gathers a whole stack at once, so the cap bounds that memory."""
    sizes = [torch.Size(s) for s in shapes]
    found = stacks(sizes, cap)
    assert sorted(i for stack in found for i in stack) == list(range(len(shapes)))
    for stack in found:
        assert len({sizes[i] for i in stack}) == 1
        assert len(stack) == 1 or len(stack) * sizes[stack[0]].numel() <= cap


def muon_and_reference(muon_lr=0.05, adam_lr=0.01, wd=0.1, momentum=0.9, betas=(0.9, 0.99)):
    """A Muon over three matrices (two of one shape) and an AdamW group, and copies of the same tensors."""
    torch.manual_seed(0)
    shapes = [(8, 6), (8, 6), (5, 9)]
    matrices = [torch.randn(s, requires_grad=True) for s in shapes]
    adam = [torch.randn(7, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    opt = Muon([dict(params=matrices, muon=True, weight_decay=wd), dict(params=adam, muon=False, weight_decay=wd)],
               lr=muon_lr, momentum=momentum, betas=betas, adam_lr=adam_lr, ns_dtype=torch.float32)
    copies = [p.detach().clone().requires_grad_() for p in matrices + adam]
    return opt, matrices, adam, copies


def test_muon_adamw_part_is_torch_adamw():
    """The non-matrix groups follow torch.optim.AdamW exactly (same decay, bias correction and eps)."""
    opt, matrices, adam, copies = muon_and_reference()
    reference = torch.optim.AdamW(copies[len(matrices):], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
    for step in range(5):
        for p, q in zip(adam, copies[len(matrices):]):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        reference.step()
        for p, q in zip(adam, copies[len(matrices):]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_muon_allocates_its_state_once(monkeypatch):
    """After the first step no optimizer state is allocated again: each step reuses the same buffers."""
    opt, matrices, adam, _ = muon_and_reference()
    for p in matrices + adam:
        p.grad = torch.randn_like(p)
    opt.step()
    buffers = [opt.state[p]["momentum_buffer"].data_ptr() for p in matrices]
    zeros = []
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: zeros.append(a) or torch.empty(0))
    opt.step()
    assert not zeros and [opt.state[p]["momentum_buffer"].data_ptr() for p in matrices] == buffers


def test_muon_update_is_the_orthogonalised_nesterov_momentum():
    """Each matrix moves by -lr * sqrt(max(1, rows/cols)) * NS(g + m * (buf - g)), buf the momentum of its
    gradients, after decoupled decay: computed here one matrix at a time, in the optimizer as stacks."""
    lr, wd, m = 0.05, 0.1, 0.9
    opt, matrices, adam, copies = muon_and_reference(muon_lr=lr, wd=wd, momentum=m)
    bufs = [torch.zeros_like(p) for p in matrices]
    for step in range(3):
        for p in matrices + adam:
            p.grad = torch.randn_like(p)
        with torch.no_grad():
            for q, p, buf in zip(copies, matrices, bufs):
                buf.mul_(m).add_(p.grad, alpha=1 - m)
                nesterov = p.grad + m * (buf - p.grad)
                q.mul_(1 - lr * wd).sub_(lr * max(1, q.size(0) / q.size(1)) ** 0.5 *
                                         newton_schulz(nesterov, dtype=torch.float32))
        opt.step()
        for p, q in zip(matrices, copies):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_newton_schulz_is_near_orthogonal():
    """Muon's orthogonalisation maps a matrix to one whose singular values are all near 1."""
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(64, 64))
    q2, _ = torch.linalg.qr(torch.randn(64, 64))
    square = q1 @ torch.diag(torch.logspace(0, 1, 64)) @ q2  # singular values spanning 10x
    for g, dtype in itertools.product((square, torch.randn(32, 96), torch.randn(96, 32)),
                                      (torch.bfloat16, torch.float32)):
        s = torch.linalg.svdvals(newton_schulz(g, dtype=dtype).float())
        assert s.min() > 0.5 and s.max() < 1.3, (g.shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = torch.nn.functional.cosine_similarity(newton_schulz(g, dtype=dtype).float().flatten(), (u @ vh).flatten(), dim=0)
        assert cos > 0.9


def test_epochs_set_the_run_s_steps_and_its_schedule(tiny_data, tmp_path, capsys):
    """train.epochs=2 (train.max_steps=0): the start line says how many steps that is, the run takes them, and
    the LR schedule ends at its floor on the last one; config.yaml records the steps it came to."""
    import yaml

    import train_single
    from utils.checkpoint.format import load_checkpoint

    overrides = tiny_overrides(tiny_data, tmp_path, train__max_steps=0, train__epochs=2, train__batch_size=32,
                               train__eval_every=0, train__save_every=0, train__log_every=100)
    assert train_single.main(overrides) == 0
    out = capsys.readouterr().out
    per_epoch = int(out.split("train.epochs=2: ")[1].split(" steps (")[1].split()[0])
    steps = 2 * per_epoch
    assert f"train.epochs=2: {steps} steps ({per_epoch} per epoch)" in out and f"done: {steps} steps" in out
    saved = load_checkpoint(tmp_path / "ckpt" / "last_checkpoint.pt")
    assert saved["trainer"]["step"] == steps
    assert saved["scheduler"]["_last_lr"][-1] == pytest.approx(1.0e-4)  # schedule.min_lr (tiny_overrides)
    assert yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["train"]["max_steps"] == steps
