"""The only training loop, shared by train_single.py and train_ddp.py.

`run_training` wires config, data, model, optimizer and checkpoints together; `Trainer.fit` runs
optimizer steps, evaluates, saves, and stops cleanly on SIGTERM/SIGUSR1 or train.stop_at_step.
Vocabulary: `step` is an optimizer step; `micro_step` indexes gradient accumulation within it.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from data.dataset import BatchPlan, load_split
from models.config import Config, TrainConfig, UserError, config_to_dict, config_to_yaml
from models.transformer import GPT
from utils import checkpoint as ckpt
from utils.distributed import (DistInfo, all_reduce_mean, any_rank, barrier, broadcast_object, gather_object,
                               maybe_no_sync, unwrap)
from utils.metrics import MetricsLogger, evaluate, flops_per_token, model_flops_utilization, peak_flops
from utils.optim import build_optimizer, build_scheduler, lr_at
from utils.precision import autocast_context, grad_scaler, resolve_run_precision

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, run again with --resume auto to continue


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class Trainer:
    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, plan: BatchPlan, val_data,
                 logger: MetricsLogger) -> None:
        self.model, self.raw = model, unwrap(model)
        self.cfg, self.tcfg, self.info, self.plan, self.val_data, self.log = cfg, cfg.train, info, plan, val_data, logger
        self.ckpt_dir = Path(cfg.paths.checkpoint_dir)
        self.optimizer = build_optimizer(self.raw, self.tcfg, info.device)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg)
        self.scaler = grad_scaler(info.device, self.tcfg.precision)
        self.autocast = autocast_context(info.device, self.tcfg.precision)
        self.step = 0
        self.best_val_loss = math.inf
        self.nonfinite_streak = 0
        self.skipped_steps = 0
        self.train_seconds = 0.0  # wall time inside optimizer steps: no evaluation, saving or startup
        self.stop_requested = False
        self.tokens_per_step = self.tcfg.batch_size * self.tcfg.grad_accum_steps * info.world_size * cfg.model.context_length
        self.flops_per_token = flops_per_token(self.raw.num_params(non_embedding=True), cfg.model.n_layers,
                                               cfg.model.dim, cfg.model.context_length)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, step_in_epoch = self.plan.position(self.step)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch, "world_size": self.info.world_size,
                "best_val_loss": self.best_val_loss, "tokens_seen": self.step * self.tokens_per_step,
                "nonfinite_streak": self.nonfinite_streak, "skipped_steps": self.skipped_steps,
                "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_val_loss = state["step"], state["best_val_loss"]
        self.nonfinite_streak, self.skipped_steps = state["nonfinite_streak"], state["skipped_steps"]
        self.train_seconds = state["train_seconds"]

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly; collective (every rank contributes its RNG)."""
        return {ckpt.MODEL: self.raw.state_dict(), ckpt.OPTIMIZER: self.optimizer.state_dict(),
                ckpt.SCHEDULER: self.scheduler.state_dict(), ckpt.SCALER: self.scaler.state_dict(),
                ckpt.TRAINER: self.state_dict(), ckpt.RNG: gather_object(ckpt.rng_state(), self.info),
                ckpt.CONFIG: config_to_dict(self.cfg), ckpt.FORMAT: ckpt.FORMAT_VERSION}

    def resume_from(self, path: Path, state: dict) -> None:
        saved = state[ckpt.CONFIG]["model"]
        ours = config_to_dict(self.cfg)["model"]
        diff = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in ours.items() if saved.get(k) != v]
        if diff:
            raise ckpt.CheckpointError(f"{path} was trained with another model shape ({'; '.join(diff)}); "
                                       f"resume with the same model settings")
        if ckpt.OPTIMIZER not in state:
            raise ckpt.CheckpointError(f"{path} holds weights only and cannot resume training")
        ckpt.load_model_weights(self.raw, state[ckpt.MODEL], str(path))
        self.optimizer.load_state_dict(state[ckpt.OPTIMIZER])
        self.scheduler.load_state_dict(state[ckpt.SCHEDULER])
        self.scaler.load_state_dict(state[ckpt.SCALER])
        self.load_state_dict(state[ckpt.TRAINER])
        rngs = state[ckpt.RNG]
        if len(rngs) != self.info.world_size:
            self.log.info(f"warning: checkpoint saved by {len(rngs)} processes, resuming on {self.info.world_size}; "
                          "the data order is unchanged but dropout noise will differ from an uninterrupted run")
        ckpt.set_rng_state(rngs[self.info.rank % len(rngs)])
        self.log.info(f"resumed from {path} at step {self.step}")

    def save(self, path: Path | None = None) -> None:
        """Collective: every rank calls it; rank 0 writes; nobody leaves before the file is complete."""
        state = self.checkpoint_state()
        if self.info.is_main:
            if path is None:
                path = ckpt.step_path(self.ckpt_dir, self.step)
                ckpt.save_checkpoint(state, path)
                ckpt.link_latest(path, self.ckpt_dir / "last_checkpoint.pt")
                ckpt.prune(self.ckpt_dir, self.tcfg.keep_last)
            else:
                ckpt.save_checkpoint(state, path)
            self.log.info(f"saved {path}")
        barrier(self.info)

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, bool]:
        """Forward/backward over all micro-steps, then one update. Returns (loss, grad norm, applied).

        One host sync per optimizer step, to read the loss and norm for the non-finite guard.
        """
        accum = self.tcfg.grad_accum_steps
        self.model.train()
        loss_sum = torch.zeros((), device=self.info.device)
        x, y = self.plan.batch(self.step, 0, self.info.device)
        for micro_step in range(accum):
            with maybe_no_sync(self.model, sync=micro_step == accum - 1):
                with self.autocast:
                    _, loss = self.model(x, y)
                if micro_step + 1 < accum:  # gather the next batch while the device works
                    x, y = self.plan.batch(self.step, micro_step + 1, self.info.device)
                # divide so the accumulated gradient is the mean over the global batch
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        loss_value, norm_value = torch.stack([loss_sum / accum, norm.float()]).tolist()
        finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or self.scaler.is_enabled())
        if finite:
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)  # fp16: the scaler itself skips steps with inf gradients
            self.scaler.update()
            applied = scale_before is None or self.scaler.get_scale() >= scale_before
        else:
            applied = False
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.skipped_steps += not applied
        if self.nonfinite_streak >= self.tcfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"loss or gradient norm was non-finite for {self.nonfinite_streak} steps in a row (step {self.step}); "
                f"stopped without saving, so the last checkpoint in {self.ckpt_dir} is intact. "
                f"Lower train.lr, raise train.warmup_steps or use train.precision=bf16")
        return loss_value, norm_value, applied

    # -- the loop ------------------------------------------------------------------------------
    def run_eval(self) -> dict[str, float]:
        metrics = evaluate(self.model, self.val_data[: self.tcfg.eval_max_bytes or None],
                           self.cfg.model.context_length, self.tcfg.batch_size, self.info, self.autocast)
        self.log.info(f"step {self.step}: val loss {metrics['loss']:.4f}, bits/byte {metrics['bits_per_byte']:.4f}, "
                      f"perplexity {metrics['perplexity']:.2f}, after {self.train_seconds:.1f} s of training")
        self.log.scalars(self.step, {"val/loss": metrics["loss"], "val/bits_per_byte": metrics["bits_per_byte"],
                                     "val/perplexity": metrics["perplexity"]})
        if self.info.is_main and self.tcfg.sample_tokens:
            self.log.text("sample", self.sample_text(), self.step)
        return metrics

    def sample_text(self) -> str:
        """A fixed-seed sample from train.sample_prompt; its own generator leaves training RNG untouched."""
        g = torch.Generator(device=self.info.device).manual_seed(0)
        prompt = torch.tensor([list(self.tcfg.sample_prompt.encode())], device=self.info.device)
        was_training = self.raw.training
        self.raw.eval()
        out = bytes(int(t) for t in self.raw.generate(prompt, self.tcfg.sample_tokens, temperature=0.8, generator=g))
        self.raw.train(was_training)
        return (self.tcfg.sample_prompt.encode() + out).decode("utf-8", errors="replace")

    def fit(self) -> int:
        t = self.tcfg
        peak, peak_source = peak_flops(self.info.device, t.precision)
        self.log.info(f"MFU against {peak_source}" + (f" ({peak / 1e12:.2f} TFLOP/s)" if peak else ""))
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=self.step, dynamic_ncols=True, leave=False,
                   disable=not (self.info.is_main and sys.stderr.isatty()))  # no bar in log files
        losses: list[float] = []
        val: dict[str, float] = {}
        t_log, steps_since_log = time.perf_counter(), 0
        exit_code = EXIT_OK
        while self.step < t.max_steps:
            t_step = time.perf_counter()
            loss, norm, _ = self.train_step()
            self.train_seconds += time.perf_counter() - t_step
            losses.append(loss)
            steps_since_log += 1
            bar.update(1)
            last = self.step == t.max_steps
            if self.step % t.log_every == 0 or last:
                elapsed = time.perf_counter() - t_log
                mean_loss = all_reduce_mean(torch.tensor(sum(losses) / len(losses), device=self.info.device),
                                            self.info).item()
                tok_s = steps_since_log * self.tokens_per_step / elapsed
                mfu = model_flops_utilization(tok_s / self.info.world_size, self.flops_per_token, peak)
                mfu = math.nan if mfu is None else mfu
                lr = lr_at(self.step - 1, t)  # the rate the last step used
                self.log.scalars(self.step, {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": norm,
                                             "train/tokens_per_sec": tok_s, "train/mfu": mfu,
                                             "train/skipped_steps": self.skipped_steps})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                self.log.info(f"step {self.step}/{t.max_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | grad norm "
                              f"{norm:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%} | skipped {self.skipped_steps}")
                losses, t_log, steps_since_log = [], time.perf_counter(), 0
            paused = time.perf_counter()  # evaluation and saving do not count towards tokens/s
            if (t.eval_every and self.step % t.eval_every == 0) or last:
                val = self.run_eval()
                if val["loss"] < self.best_val_loss:
                    self.best_val_loss = val["loss"]
                    self.save(self.ckpt_dir / "best_model.pt")
            preempted = any_rank(self.stop_requested, self.info)
            stop = preempted or self.step == t.stop_at_step
            if (t.save_every and self.step % t.save_every == 0) or last or stop:
                self.save()
            t_log += time.perf_counter() - paused
            if stop:
                exit_code = EXIT_PREEMPTED if preempted else EXIT_OK
                why = "stop signal received" if preempted else f"train.stop_at_step={t.stop_at_step} reached"
                self.log.info(f"{why}: stopped at step {self.step}; continue with --resume auto")
                break
        bar.close()
        if self.step == t.max_steps:
            hp = {f"{name}.{k}": v for name, section in (("model", self.cfg.model), ("train", t))
                  for k, v in vars(section).items()}
            self.log.hparams(hp, {"hparam/val_loss": val.get("loss", math.nan),
                                  "hparam/best_val_loss": self.best_val_loss})
            self.log.info(f"done: {self.step} steps in {self.train_seconds:.1f} s of training, "
                          f"best val loss {self.best_val_loss:.4f}")
        return exit_code


# -- wiring ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror}); choose another with "
                        f"{'paths.checkpoint_dir' if 'checkpoint' in what else 'paths.log_dir'}=DIR") from None


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


def maybe_compile(model: nn.Module, cfg: Config, device: torch.device, log: MetricsLogger) -> nn.Module:
    """torch.compile, tried on one batch-shaped input; eager with a warning if compilation fails."""
    if not cfg.train.compile:
        return model
    compiled = torch.compile(model)
    x = torch.zeros(cfg.train.batch_size, cfg.model.context_length, dtype=torch.long, device=device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                autocast_context(device, cfg.train.precision):
            compiled(x, x)[1].backward()
    except Exception as e:  # inductor needs a working C++/Triton toolchain
        log.info(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                 f"training eagerly")
        compiled = model
    model.zero_grad(set_to_none=True)
    return compiled


def load_data(cfg: Config, info: DistInfo) -> tuple[BatchPlan, np.ndarray]:
    """This rank's batch plan over the training split, and the validation split."""
    t = cfg.train
    train_data, val_data = load_split(cfg.data.dir, "train"), load_split(cfg.data.dir, "val")
    return BatchPlan(train_data, cfg.model.context_length, t.batch_size, t.grad_accum_steps, info.rank,
                     info.world_size, t.seed), val_data


def build_trainer(cfg: Config, info: DistInfo, plan: BatchPlan, val_data: np.ndarray, logger: MetricsLogger,
                  wrap: Callable[[nn.Module], nn.Module] | None = None) -> Trainer:
    """The model, seeded, compiled and wrapped as configured, in its Trainer: what run_training
    trains and scripts/benchmark.py times."""
    t = cfg.train
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    seed_everything(t.seed)  # identical initial weights on every rank and world size
    model = GPT(cfg.model).to(info.device)
    model.activation_checkpointing = t.activation_checkpointing
    seed_everything(t.seed + info.rank)  # per-rank dropout noise
    model_for_training = maybe_compile(model, cfg, info.device, logger)
    model_for_training = wrap(model_for_training) if wrap else model_for_training
    return Trainer(model_for_training, cfg, info, plan, val_data, logger)


def run_training(cfg: Config, info: DistInfo, resume: str | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> int:
    """Build everything from the config and train; returns the process exit code."""
    ckpt_dir, log_dir = Path(cfg.paths.checkpoint_dir), Path(cfg.paths.log_dir)
    if info.is_main:
        check_writable(ckpt_dir, "checkpoint folder")
        check_writable(log_dir, "log folder")
    # decide on rank 0 what to resume from, so every rank loads the same file
    decision = None
    if info.is_main:
        if resume == "auto":
            found = ckpt.latest_valid(ckpt_dir)
            decision = str(found[0]) if found else None
        elif resume:
            decision = resume
        elif any(ckpt_dir.glob("step_*.pt")):
            decision = UserError(f"{ckpt_dir} already holds checkpoints of a run; continue it with --resume auto, "
                                 f"or start a new run with paths.checkpoint_dir=NEW_DIR (nothing was overwritten)")
    decision = broadcast_object(decision, info)
    if isinstance(decision, UserError):
        raise decision
    resume_state = ckpt.load_checkpoint(decision) if decision else None
    cfg, precision = resolve_run_precision(cfg, info, resume_state)

    plan, val_data = load_data(cfg, info)
    t = cfg.train
    logger = MetricsLogger(log_dir, info.is_main)
    try:
        trainer = build_trainer(cfg, info, plan, val_data, logger, wrap)
        model = trainer.raw
        if info.is_main:
            ckpt.remove_stale_temporaries(ckpt_dir)
            (ckpt_dir / "config.yaml").write_text(config_to_yaml(cfg))
        logger.info(config_to_yaml(cfg).rstrip())
        logger.info(f"python {platform.python_version()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
                    f"device {torch.cuda.get_device_name(info.device) if info.device.type == 'cuda' else platform.processor() or 'cpu'} | git {git_revision()}")
        logger.info(f"world size {info.world_size} | batch {t.batch_size} per process x {t.grad_accum_steps} accumulation "
                    f"x {info.world_size} = global batch {t.batch_size * t.grad_accum_steps * info.world_size} sequences, "
                    f"{trainer.tokens_per_step:,} tokens per step | {plan.steps_per_epoch} steps per epoch")
        logger.info(f"model: {model.num_params():,} parameters | data: {len(plan.data):,} train bytes, "
                    f"{len(val_data):,} val bytes from {cfg.data.dir}")
        logger.info(f"precision {precision.name}: {precision.reason}")
        if resume_state is not None:
            trainer.resume_from(Path(decision), resume_state)
        elif resume == "auto":
            logger.info(f"no checkpoint in {ckpt_dir}; starting fresh")
        previous = {s: signal.signal(s, lambda *_: setattr(trainer, "stop_requested", True))
                    for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return trainer.fit()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        logger.close()
