"""Wiring a training run: resolve and check it first (resolve_run), then build everything from the resolved
config, then train.

Order matters for trust: the ranks agree on the config and the data, the checkpoint folder says
fresh, resume or refuse, the checkpoint (resumed, or a fine-tune's) fits, the data and the validation
pass are feasible and the model fits in memory, and only then is anything written (config.yaml, once;
the log, TensorBoard).
"""

from __future__ import annotations

import dataclasses
import platform
import random
import subprocess
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from data.dataset import BatchPlan, load_split
from data.shards import verify_dataset
from models.config import Config, DistributedConfig
from models.config_checks import ConfigError
from models.config_loader import config_to_dict, config_to_yaml
from models.transformer import GPT
from utils.checkpoint import format as ckpt
from utils.checkpoint.folder import Checkpointer
from utils.device import device_name
from utils.distributed.parallel import materialize, shards
from utils.distributed.process_group import DistInfo, agree_by_store, broadcast_object, without_ddp
from utils.errors import UserError
from utils.metrics.flops import flops_per_token, peak_flops
from utils.metrics.logger import MetricsLogger, ThroughputMeter
from utils.train.finetune import check_init, load_init
from utils.train.preflight import check_fits, check_memory, check_ranks_agree, check_writable, on_every_rank
from utils.train.optim import build_optimizer, build_scheduler
from utils.precision import Precision, autocast_context, grad_scaler, resolve_precision
from utils.metrics.sinks import require_wandb
from utils.train.sanity import start_warnings
from utils.train.stopping import StopFlag
from utils.train.trainer import Trainer
from utils.train.validation import Validator

WARM_UP_AGREE_S = 10.0  # FSDP: how long a rank whose warm-up failed waits to hear the others'
Wrap = Callable[[nn.Module, Precision], nn.Module]  # parallelisation, given the run's resolved precision


# -- checks (nothing written; the checks themselves are in utils/train/preflight.py) -------------
def checkpointer_for(cfg: Config, info: DistInfo) -> Checkpointer:
    return Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last, info, sharded=cfg.distributed.sharded,
                        verify=cfg.checkpoint.verify)


def decide_resume(checkpointer: Checkpointer, resume: str | None, info: DistInfo) -> tuple[str, dict] | None:
    """Rank 0 decides fresh/resume/refuse, so every rank loads the same file (or fails alike)."""
    decision: str | UserError | None = None
    found = None
    if info.is_main:
        try:
            found = checkpointer.find_resume(resume, warn=print)
            decision = str(found[0]) if found else None
        except UserError as e:
            decision = e
    decision = broadcast_object(decision, info)
    if isinstance(decision, UserError):
        raise decision
    if not decision:
        return None
    # rank 0 loaded it already; another node may not see the file
    return decision, on_every_rank(info, lambda: found[1] if found else checkpointer.load(Path(decision)))


# -- building ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return (rev + (" (dirty)" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def warm_up(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], autocast: AbstractContextManager) -> str:
    """Compile the model's graphs by running them once: a training forward and backward, and an evaluation
    forward, on the first training batch. "" when both ran, "oom" when memory ran out (not a compile failure:
    the first step backs off), else the failure in one line. Under DDP without DDP, whose gradient all-reduce
    a failing rank would leave the others waiting in.

    The first batch, not a batch-shaped stand-in: its inputs are views into the (B, T + 1) windows, and
    dynamo guards on strides, so a contiguous stand-in compiles a graph the first real step cannot use."""
    x, y = batch
    model = without_ddp(model)
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), autocast:
            model(x, y)[1].backward()
            with torch.no_grad():
                model.eval()
                model(x)
    except torch.OutOfMemoryError:
        return "oom"
    except Exception as e:  # inductor needs a working C++/Triton toolchain
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        model.train()
        model.zero_grad(set_to_none=True)
    return ""


def compiles(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], autocast: AbstractContextManager,
             info: DistInfo, cfg: DistributedConfig, log: MetricsLogger) -> bool:
    """Whether to train compiled: every rank warms up (warm_up), and the ranks decide together, through the
    store, so that all build the same model. FSDP gathers inside the warm-up, so a rank that fails there while
    the others wait in a gather says so in one line after a few seconds, and the watchdog ends the others."""
    failure = warm_up(model, batch, autocast)
    if info.world_size > 1:
        failures = agree_by_store("compile", failure, info,
                                  WARM_UP_AGREE_S if failure and cfg.sharded else cfg.timeout_s)
        if failures is None:
            raise UserError(f"torch.compile failed on rank {info.rank} ({failure}) while the other ranks wait for it "
                            f"inside the sharded model; set train.compile=false")
        failure = next((f"{f} on rank {r}" for r, f in enumerate(failures) if f and f != "oom"),
                       "oom" if "oom" in failures else "")
    if failure == "oom":
        log.info("warning: the compile warm-up ran out of memory; training compiled, and the first step backs off")
    elif failure:
        log.info(f"warning: torch.compile failed ({failure}); training eagerly")
    return failure in ("", "oom")


def build_model(cfg: Config, precision: Precision, info: DistInfo, wrap: Wrap | None, compile: bool,
                init: tuple[Path, dict] | None = None) -> tuple[GPT, nn.Module]:
    """The GPT and the module that trains it (compiled if asked, then wrapped), its initial weights from
    train.seed alone, or from `init` (check_init: a fine-tune's checkpoint): the same for one process, DDP and
    FSDP on any number of ranks. FSDP on several ranks builds it on the meta device and shards it before it
    has storage, so no rank holds it whole."""
    t = cfg.train
    on_meta = wrap is not None and shards(cfg.distributed, info)
    with torch.device("meta") if on_meta else nullcontext():
        model = GPT(cfg.model, seed=t.seed)
    if not on_meta:
        model.to(info.device)
    model.activation_checkpointing = t.activation_checkpointing
    model_for_training = torch.compile(model) if compile else model  # lazy: compiles on the first call
    model_for_training = wrap(model_for_training, precision) if wrap else model_for_training
    if on_meta:
        materialize(model, info.device, t.seed)
    if init:
        load_init(model, *init)
    return model, model_for_training


def agree_precision(cfg: Config, info: DistInfo, resume_state: dict | None) -> Precision:
    """train.precision resolved (`auto` measured), and why. Rank 0 decides and every rank follows, so a
    measurement cannot split the ranks."""
    trained_with = resume_state[ckpt.CONFIG]["train"].get("precision") if resume_state else None
    precision = None
    if info.is_main:
        precision = resolve_precision(cfg.train.precision, info.device, cfg.model, cfg.train.batch_size, trained_with)
    precision = broadcast_object(precision, info)
    if precision.name == "fp16" and cfg.distributed.sharded:
        raise ConfigError(f"train.precision={cfg.train.precision} resolved to fp16 ({precision.reason}), which "
                          f"distributed.strategy=fsdp does not support (FSDP2 has no sharded GradScaler); "
                          f"use train.precision=fp32 or distributed.strategy=ddp")
    return precision


def resolved(cfg: Config, precision: Precision, steps_per_epoch: int) -> Config:
    """cfg as the run uses it and config.yaml records it: train.precision named (never `auto`), and
    train.epochs as the train.max_steps it comes to."""
    steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision.name, max_steps=steps,
                                                              epochs=0))


def load_data(cfg: Config, info: DistInfo) -> tuple[BatchPlan, np.ndarray]:
    """This rank's batch plan over the training split, and the validation split."""
    t = cfg.train
    verify_dataset(cfg.data.dir, cfg.data.verify)
    train_data, val_data = load_split(cfg.data.dir, "train"), load_split(cfg.data.dir, "val")
    return BatchPlan(train_data, cfg.model.context_length, t.batch_size, t.grad_accum_steps, info.rank,
                     info.world_size, t.seed), val_data


def build_trainer(cfg: Config, precision: Precision, info: DistInfo, plan: BatchPlan, val_data: np.ndarray,
                  logger: MetricsLogger, wrap: Wrap | None = None, stop: StopFlag | None = None,
                  checkpointer: Checkpointer | None = None, init: tuple[Path, dict] | None = None) -> Trainer:
    """The model, seeded (or a fine-tune's `init`), compiled and wrapped as configured, in its Trainer: what
    run_training trains and scripts/benchmark.py times. precision is the run's resolved one
    (agree_precision), the only one any part of the run uses."""
    t = cfg.train
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    model, model_for_training = build_model(cfg, precision, info, wrap, t.compile, init)
    seed_everything(t.seed + info.rank)  # per-rank dropout noise
    autocast = autocast_context(info.device, precision.name)
    # an eager run reads no batch before its first step; a failed compile is built again, eager
    if t.compile and not compiles(model_for_training, plan.batch(0, 0, info.device), autocast, info, cfg.distributed,
                                  logger):
        model, model_for_training = build_model(cfg, precision, info, wrap, compile=False, init=init)
    optimizer = build_optimizer(model, cfg.optim, info.device, precision.name)
    peak, peak_source = peak_flops(info.device, precision.name)
    logger.info(f"MFU against {peak_source}" + (f" ({peak / 1e12:.2f} TFLOP/s)" if peak else ""))
    meter = ThroughputMeter(plan.global_batch * cfg.model.context_length, t.max_steps,
                            flops_per_token(model.num_params(non_embedding=True), cfg.model.n_layers, cfg.model.dim,
                                            cfg.model.context_length), peak)
    return Trainer(model=model_for_training, optimizer=optimizer,
                   scheduler=build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, t.max_steps),
                   scaler=grad_scaler(info.device, precision.name), autocast=autocast, plan=plan,
                   validator=Validator(model_for_training, val_data, cfg.model.context_length, t.batch_size,
                                       cfg.eval, info, autocast, sharded=cfg.distributed.sharded),
                   checkpointer=checkpointer or checkpointer_for(cfg, info),
                   logger=logger, meter=meter, stop=stop or StopFlag(), info=info, config=cfg)


def summary(cfg: Config, info: DistInfo, plan: BatchPlan, val_data: np.ndarray, n_params: int,
            precision: Precision, logger: MetricsLogger) -> list[str]:
    """The start-up lines on the console (the full resolved config goes to the log file)."""
    m, t = cfg.model, cfg.train
    batch = plan.global_batch
    return [
        f"model: {n_params:,} parameters (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, context "
        f"{m.context_length})",
        f"data: {cfg.data.dir}: {len(plan.data):,} train bytes, {len(val_data):,} val bytes, "
        f"{plan.steps_per_epoch} steps per epoch",
        f"global batch: {t.batch_size} per process x {t.grad_accum_steps} accumulation x {info.world_size} "
        f"process(es) = {batch} sequences, {batch * m.context_length:,} tokens per step",
        f"precision: {precision.name} ({precision.reason})",
        f"device: {info.device} ({device_name(info.device)}) | torch {torch.__version__} | python {platform.python_version()} | "
        f"git {git_revision()}",
        f"checkpoints: {cfg.checkpoint.dir} | log: {logger.path} | TensorBoard: {logger.tb_dir}",
    ]


def run_name(config_path: str | None) -> str:
    """TensorBoard runs and logs are named after the config file: <stem>-<timestamp>."""
    return Path(config_path).stem if config_path else "defaults"


@dataclass(frozen=True)
class Run:
    """A run resolved before anything is written: the command line, the config file, a fine-tune's base (the
    CLI), the checkpoint resumed, `auto` precision and train.epochs, turned into the one Config every part of
    the run uses and config.yaml records, and what was loaded on the way. A back-off's micro-batch is the
    Trainer's state, saved in its checkpoints."""
    cfg: Config
    precision: Precision
    plan: BatchPlan
    val_data: np.ndarray
    resume: tuple[str, dict] | None  # (path, checkpoint) the run continues from
    init: tuple[Path, dict] | None  # a fine-tune's checkpoint (none when resuming: the run's own has the weights)
    notes: list[str]  # start-up warnings, for the console and the log file


def resolve_run(cfg: Config, info: DistInfo, checkpointer: Checkpointer, resume: str | None) -> Run:
    """Every check, on every rank, nothing written (the folder claimed): the checkpoint folder says fresh,
    resume or refuse, the checkpoint fits, the data and the validation pass are feasible, the model fits in
    memory and the folders can be written."""
    resumed = decide_resume(checkpointer, resume, info)
    if resumed:
        check_fits(cfg, *resumed)
    precision = agree_precision(cfg, info, resumed[1] if resumed else None)

    def local_checks() -> Run:
        init = check_init(cfg) if cfg.train.init_from and not resumed else None
        plan, val_data = load_data(cfg, info)
        Validator.check_feasible(val_data, cfg.eval)
        run_cfg = resolved(cfg, precision, plan.steps_per_epoch)
        notes = start_warnings(run_cfg, getattr(val_data, "sizes", [len(val_data)]), plan.steps_per_epoch)
        if cfg.train.epochs:
            notes.insert(0, f"train.epochs={cfg.train.epochs}: {run_cfg.train.max_steps} steps "
                            f"({plan.steps_per_epoch} per epoch)")
        check_memory(cfg, info)
        require_wandb(cfg.logging)
        if info.is_main:
            check_writable(Path(cfg.checkpoint.dir), "checkpoint.dir")
            check_writable(Path(cfg.logging.dir), "logging.dir")
        return Run(run_cfg, precision, plan, val_data, resumed, init, notes)

    return on_every_rank(info, local_checks)


def run_training(cfg: Config, info: DistInfo, resume: str | None = None, wrap: Wrap | None = None,
                 run_name: str = "run") -> int:
    """Resolve and check, then build everything from the resolved config and train; the process exit code."""
    check_ranks_agree(cfg, info)
    checkpointer = checkpointer_for(cfg, info)
    checkpointer.claim()  # rank 0 holds checkpoint.dir from here: a second run into it is refused on every rank
    try:
        return _train(checkpointer, cfg, info, resume, wrap, run_name)
    finally:
        checkpointer.release()  # on every path out; removes the folder too if claim made it and nothing was written


def _train(checkpointer: Checkpointer, cfg: Config, info: DistInfo, resume: str | None, wrap: Wrap | None,
           run_name: str) -> int:
    run = resolve_run(cfg, info, checkpointer, resume)
    cfg = run.cfg
    if info.is_main:
        for line in run.notes:  # on the console now, in the log file once it exists
            print(line)

    # accepted: from here on the run writes
    # the logger first: its W&B run can still be refused (a login), and every rank hears it before config.yaml
    logger = on_every_rank(info, lambda: MetricsLogger(cfg.logging.dir, info.is_main, f"{run_name}-"
                                                       f"{time.strftime('%Y%m%d-%H%M%S')}", logging=cfg.logging,
                                                       config=config_to_dict(cfg)))
    try:
        checkpointer.accept(config_to_yaml(cfg))
        logger.file_only(config_to_yaml(cfg).rstrip())
        for line in run.notes:
            logger.file_only(line)
        with StopFlag() as stop:
            trainer = build_trainer(cfg, run.precision, info, run.plan, run.val_data, logger, wrap, stop,
                                    checkpointer, run.init)
            for line in summary(cfg, info, run.plan, run.val_data, trainer.raw.num_params(), run.precision, logger):
                logger.info(line)
            if run.resume:
                trainer.restore(*run.resume)
            elif run.init:
                logger.info(f"fine-tuning from the weights of {run.init[0]} (its step "
                            f"{run.init[1].get(ckpt.TRAINER, {}).get('step', '?')}), at step 0")
            elif resume == "auto":
                logger.info(f"no checkpoint in {cfg.checkpoint.dir}; starting fresh")
            code = trainer.fit()
    finally:
        logger.close()
    if logger.failure:  # at the run's last writes (a failure during training stopped it already)
        raise UserError(f"{logger.failure}; the training finished and its checkpoints are saved")
    return code
