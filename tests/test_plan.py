"""The planner (scripts/plan.py, utils/train/memory_plan.py): its counts against a real GPT, the peak
against the live tensor bytes of a real training step, the micro-batch search, --json, bad input."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.config import ModelConfig
from models.config_loader import load_config
from models.transformer import GPT
from scripts import plan as plan_cli
from utils.precision import autocast_context
from utils.train.memory_plan import count_saved_bytes, plan_memory, shard_numel
from utils.train.optim import build_optimizer

CPU = torch.device("cpu")
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.context_length=16",
        "train.batch_size=3", "train.precision=fp32"]

model_options = st.fixed_dictionaries({
    "n_layers": st.integers(1, 2), "dropout": st.sampled_from([0.0, 0.1]),
    "pos_emb": st.sampled_from(["learned", "rope"]), "norm": st.sampled_from(["layernorm", "rmsnorm"]),
    "qk_norm": st.booleans(), "activation": st.sampled_from(["gelu", "relu2", "swiglu"]), "bias": st.booleans(),
    "tie_embeddings": st.booleans()})


def tiny_model(**options) -> ModelConfig:
    return ModelConfig(vocab_size=256, context_length=16, dim=32, n_heads=2, ffn_dim=48, **options)


def real_saved_bytes(cfg: ModelConfig, batch: int, precision: str, checkpointing: bool,
                     param_dtype: torch.dtype) -> int:
    """What autograd keeps for backward in a real forward: each storage once, parameters excluded."""
    model = GPT(cfg).train()
    for p in model.parameters():  # as FSDP gathers them: parameters in param_dtype, buffers as they are
        p.data = p.data.to(param_dtype)
    model.activation_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    idx = torch.randint(0, 256, (batch, cfg.context_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(CPU, precision):
        model(idx, torch.randint(0, 256, idx.shape))
    return sum(s.nbytes() for s in saved.values())


@settings(max_examples=8, deadline=None)
@given(options=model_options, precision=st.sampled_from(["fp32", "bf16"]), checkpointing=st.booleans(),
       batch=st.integers(1, 3), param_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fake_count_equals_the_real_saved_tensors(options, precision, checkpointing, batch, param_dtype):
    """The activations counted on fake tensors are the bytes a real forward saves, for any model option,
    with fp32 weights or bf16 ones (FSDP's bf16 gathers)."""
    cfg = tiny_model(**options)
    param_dtype = param_dtype if precision == "bf16" else torch.float32
    assert sum(count_saved_bytes(cfg, batch, CPU, precision, checkpointing, param_dtype)) == \
        real_saved_bytes(cfg, batch, precision, checkpointing, param_dtype)


@settings(max_examples=6, deadline=None)
@given(options=model_options, world_size=st.integers(1, 5), optimizer=st.sampled_from(["adamw", "muon"]))
def test_state_matches_the_real_model_and_optimizer(options, world_size, optimizer):
    """Parameters are the real GPT's; FSDP's shard is torch.chunk's largest piece; the optimizer state
    is what utils/train/optim.py's optimizer holds after a step."""
    overrides = [f"model.{k}={v}" for k, v in options.items()] + TINY[2:] + [
        "model.dim=32", "model.n_heads=2", f"optim.name={optimizer}", "distributed.strategy=fsdp"]
    cfg = load_config(None, overrides)
    plan = plan_memory(cfg, world_size, CPU, "fp32")
    model = GPT(cfg.model)
    params = list({id(p): p for p in model.parameters()}.values())
    assert plan.parameters == model.num_params() == sum(p.numel() for p in params)
    expected_local = sum(torch.chunk(p, world_size)[0].numel() if p.dim() else 1 for p in params)
    assert plan.parameters_per_rank == (expected_local if world_size > 1 else plan.parameters)
    assert all(shard_numel(p, 1) == p.numel() for p in params)
    assert plan.weights == plan.gradients == 4 * plan.parameters_per_rank
    if world_size == 1:
        opt = build_optimizer(model, cfg.optim, CPU, "fp32")
        model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))[1].backward()
        opt.step()
        held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        assert plan.optimizer_state == held


class LiveBytes(TorchDispatchMode):
    """The peak of tensor bytes alive during the block: what existed before (`start`) plus every
    storage an operation creates, until it is freed."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in existing}
        self.now = self.peak = sum(self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                storage = t.untyped_storage()
                self.live[storage._cdata] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, storage._cdata)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)


@pytest.mark.parametrize("extra", [[], ["train.activation_checkpointing=true"], ["train.precision=bf16"],
                                   ["train.grad_accum_steps=2"], ["optim.name=muon", "model.dropout=0.1"]])
def test_peak_matches_a_real_training_step(extra):
    """The predicted peak is within 15% of the tensor bytes alive at the peak of a real step (the second:
    the optimizer state exists), measured on every allocation; one process, CPU."""
    cfg = load_config(None, [*TINY, "model.dim=64", "model.ffn_dim=256", "model.context_length=32",
                             "train.batch_size=8", *extra])
    t = cfg.train
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    model.activation_checkpointing = t.activation_checkpointing
    opt = build_optimizer(model, cfg.optim, CPU, t.precision)
    x = torch.randint(0, 256, (t.batch_size, cfg.model.context_length))
    for _ in range(2):
        existing = [*model.parameters(), *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
        with LiveBytes(existing) as live:
            for _ in range(t.grad_accum_steps):
                with autocast_context(CPU, t.precision):
                    loss = model(x, x)[1]
                (loss / t.grad_accum_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    predicted = plan_memory(cfg, 1, CPU, t.precision).peak_bytes(t.batch_size)
    assert predicted == pytest.approx(live.peak, rel=0.15)


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_memory(load_config(None, TINY), 1, CPU, "fp32")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(memories=st.lists(st.integers(1, 2 ** 32), min_size=2, max_size=4), checkpointing=st.booleans())
def test_largest_batch_fits_and_one_more_does_not(tiny_plan, memories, checkpointing):
    """For any memory size, the chosen micro-batch fits and one more sequence does not; more memory
    never chooses a smaller batch."""
    plan = tiny_plan
    chosen = [plan.largest_batch(m, checkpointing) for m in sorted(memories)]
    assert chosen == sorted(chosen)
    for memory, batch in zip(sorted(memories), chosen):
        assert batch == 0 or plan.peak_bytes(batch, checkpointing) <= memory
        assert plan.peak_bytes(batch + 1, checkpointing) > memory


@given(per_rank=st.integers(1, 200), largest=st.integers(0, 300))
def test_keep_global_batch(per_rank, largest):
    """The micro-batch times the accumulation is the configured per-rank batch, the micro-batch fits."""
    batch, accum = plan_cli.keep_global_batch(per_rank, largest)
    if largest == 0:
        assert (batch, accum) == (0, 0)
    else:
        assert batch * accum == per_rank and 1 <= batch <= largest


def test_json_has_every_figure_and_the_peak(capsys):
    """--json prints one object; peak_bytes is the memory plan's peak at the configured micro-batch."""
    args = ["--json", "--device", "cpu", "--world-size", "2", "--device-memory", "1GiB", "--peak-tflops", "100",
            "--mfu", "0.5", *TINY,
            "distributed.strategy=fsdp"]
    assert plan_cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"parameters", "parameters_per_rank", "weights_bytes", "gradients_bytes", "optimizer_state_bytes",
            "activations_bytes", "peak_bytes", "largest_micro_batch", "keep_global_batch", "flops_per_step",
            "seconds_per_step", "mfu", "fsdp_gathered_bytes"} <= set(out)
    cfg = load_config(None, [*TINY, "distributed.strategy=fsdp"])
    assert out["peak_bytes"] == plan_memory(cfg, 2, CPU, "fp32").peak_bytes(3)
    assert out["device_memory_bytes"] == 2 ** 30 and out["fits"] is True
    assert out["keep_global_batch"] == {"batch_size": 3, "grad_accum_steps": 1}
    assert out["seconds_per_step"] == pytest.approx(out["flops_per_step"] / (2 * 100e12 * 0.5))


def test_report_names_each_figure(capsys):
    assert plan_cli.main(["--device", "cpu", "--device-memory", "4GB", *TINY]) == 0
    out = capsys.readouterr().out
    for label in ("parameters", "weights", "gradients", "optimizer state", "activations", "peak",
                  "largest micro-batch", "FLOPs per step", "time"):
        assert label in out


@pytest.mark.parametrize("argv, fragment", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["--device-memory", "80XB"], "--device-memory '80XB' is not a size"),
    (["--device-memory", "0GiB"], "is not a size"),
    (["--device-memory", "0.5"], "is not a size from 1MiB"),
    (["--device-memory", "9" * 400 + "GiB"], "is not a size from 1MiB"),
    (["--world-size", "0"], "--world-size: must be a whole number from 1"),
    (["--world-size", "two"], "--world-size: must be a whole number"),
    (["--mfu", "1.5"], "--mfu: must be a number above 0 and at most 1"),
    (["--mfu", "nan"], "--mfu: must be a number above 0"),
    (["--peak-tflops", "-3"], "--peak-tflops: must be a number above 0"),
    (["--bogus"], "unrecognized argument: --bogus"),
])
def test_bad_input_is_one_line(capsys, argv, fragment):
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
