"""The whole config schema: typed, frozen sections, each received whole by the code it configures.

| section       | received by                                       |
| model         | models/transformer.py GPT                         |
| data          | data/dataset.py (the splits and the batch plan)   |
| train         | utils/train/trainer.py Trainer (the loop)         |
| optim         | utils/train/optim.py build_optimizer              |
| schedule      | utils/train/optim.py build_scheduler              |
| eval          | utils/train/validation.py Validator               |
| checkpoint    | utils/checkpoint/folder.py Checkpointer           |
| logging       | utils/metrics/logger.py MetricsLogger             |
| distributed   | utils/distributed/process_group.py                |
| health        | utils/train/guard.py HealthGuard (and health.py)  |

Loading (YAML, overrides, the keys that moved between sections) is models/config_loader.py; the
checks every section's __post_init__ makes, and their error, are models/config_checks.py. No
torch import here, so loading and validating a config is fast and cheap to test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config_checks import check, exactly_one, non_negative, one_of, positive


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    """byte-level: at least 256, one id per byte value (more only pads the embedding)"""
    context_length: int = 512
    """tokens the model attends over"""
    dim: int = 256
    """residual stream width"""
    n_layers: int = 6
    """transformer blocks"""
    n_heads: int = 8
    """attention heads; must divide dim"""
    ffn_dim: int = 1024
    """hidden width of the MLP (for swiglu, the width of each of its two branches)"""
    dropout: float = 0.0
    """dropout on attention weights and residual branches during training; 0 = off"""
    pos_emb: str = "learned"
    """learned (GPT-2) or rope (rotary, Su et al. 2021)"""
    norm: str = "layernorm"
    """layernorm or rmsnorm"""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention"""
    activation: str = "gelu"
    """gelu, relu2 (squared ReLU) or swiglu"""
    bias: bool = True
    """biases in linear layers and norms"""
    tie_embeddings: bool = True
    """share the token embedding with the LM head"""
    zero_init_proj: bool = False
    """start residual output projections at zero instead of GPT-2's scaled init"""
    rope_base: float = 10000.0
    """rope only: the base of the rotary frequencies"""

    def __post_init__(self) -> None:
        positive("model", self, "vocab_size", "context_length", "dim", "n_layers", "n_heads", "ffn_dim")
        check(self.vocab_size >= 256, f"model.vocab_size must be >= 256, one id per byte value (got {self.vocab_size})")
        check(self.dim % self.n_heads == 0, f"model.n_heads={self.n_heads} must divide model.dim={self.dim}; "
               f"pick n_heads from {[h for h in range(1, 33) if self.dim % h == 0]}")
        check(self.pos_emb != "rope" or (self.dim // self.n_heads) % 2 == 0,
               "model.pos_emb=rope needs an even head size (dim / n_heads)")
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1) (got {self.dropout})")
        one_of("model.pos_emb", self.pos_emb, ("learned", "rope"))
        one_of("model.norm", self.norm, ("layernorm", "rmsnorm"))
        one_of("model.activation", self.activation, ("gelu", "relu2", "swiglu"))
        check(self.rope_base > 0, "model.rope_base must be positive")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/default"
    """folder with the shards and manifest.json from data/prepare_dataset.py"""
    verify: bool = False
    """also check every train/val shard's sha256 at start (sizes are always checked)"""


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    """sequences per process per micro-step"""
    grad_accum_steps: int = 1
    """micro-steps per optimizer step; global batch = batch_size * grad_accum_steps * world_size"""
    max_steps: int = 5000
    """optimizer steps the run (and its LR schedule) is planned for; 0 when train.epochs plans it"""
    epochs: int = 0
    """passes over the training split the run (and its LR schedule) is planned for instead of max_steps, turned
    into steps once the split's size is known; 0 = max_steps plans it (setting one clears the other)"""
    stop_at_step: int = 0
    """end after this optimizer step as a preemption does (checkpoint, clean exit); 0 = off"""
    seed: int = 1337
    """initial weights and the data order; 0 <= seed < 2**31"""
    precision: str = "bf16"
    """auto, fp32, bf16 or fp16 (autocast; fp16 adds a GradScaler); auto: bf16 on GPUs that have it
    (else fp16), and on CPUs only where bf16 matmuls measure faster than fp32 (utils/precision.py)"""
    compile: bool = False
    """torch.compile the model; falls back to eager with a warning when compilation fails"""
    tf32: bool = True
    """allow TF32 matmuls on Ampere and newer GPUs"""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward to save memory"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 = no clipping (the norm is still logged)"""
    log_every: int = 10
    """optimizer steps between log lines"""
    init_from: str = ""
    """fine-tune: a checkpoint (file or folder) whose weights and model section a new run starts from, at step 0"""

    def __post_init__(self) -> None:
        positive("train", self, "batch_size", "grad_accum_steps", "log_every")
        non_negative("train", self, "max_steps", "epochs", "stop_at_step", "grad_clip")
        exactly_one("train", self, "max_steps", "epochs", "the run's length")
        check(0 <= self.seed < 2 ** 31, f"train.seed must be in [0, 2**31) (got {self.seed})")
        one_of("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    """adamw, or muon (Muon on hidden 2-D weight matrices, AdamW on the rest)"""
    lr: float = 3.0e-4
    """peak learning rate (of the AdamW part, with muon)"""
    weight_decay: float = 0.1
    """applied to matrices only, never to biases and norm gains"""
    beta1: float = 0.9
    """AdamW first-moment decay"""
    beta2: float = 0.95
    """AdamW second-moment decay"""
    fused: bool = True
    """use the fused AdamW kernel (CUDA, and CPU on torch 2.4+)"""
    muon_lr: float = 0.02
    """muon only: the rate of the Muon part (hidden matrices)"""
    muon_momentum: float = 0.95
    """muon only: Nesterov momentum of the Muon part"""
    base_width: int = 0
    """adamw only: the blocks' matrices get lr x base_width / model.dim, the maximal-update parametrisation's
    hidden-weight rule (Yang et al. 2022), so a rate found at base_width holds at other widths; 0: off"""

    def __post_init__(self) -> None:
        one_of("optim.name", self.name, ("adamw", "muon"))
        positive("optim", self, "lr", "muon_lr")
        non_negative("optim", self, "weight_decay", "base_width")
        check(not (self.base_width and self.name == "muon"), "optim.base_width scales the AdamW rate of the "
              "blocks' matrices, which Muon trains under optim.name=muon; set optim.base_width=0 or optim.name=adamw")
        check(0 <= self.muon_momentum < 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               "optim.beta1, optim.beta2 and optim.muon_momentum must be in [0, 1)")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"
    """cosine (warmup then cosine to min_lr) or wsd (warmup, constant, linear cooldown to min_lr)"""
    warmup_steps: int = 200
    """optimizer steps of linear warmup from 0 to optim.lr"""
    min_lr: float = 3.0e-5
    """the rate at the end of the schedule; at most optim.lr"""
    cooldown_frac: float = 0.2
    """wsd only: fraction of train.max_steps spent in the final linear cooldown"""

    def __post_init__(self) -> None:
        one_of("schedule.name", self.name, ("cosine", "wsd"))
        non_negative("schedule", self, "warmup_steps", "min_lr")
        check(0 <= self.cooldown_frac <= 1, "schedule.cooldown_frac must be in [0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 500
    """optimizer steps between validation passes (and always at the end); 0 = only at the end"""
    max_bytes: int = 0
    """cap on validation bytes per pass (a fixed prefix, so still deterministic); 0 = whole split"""
    sample_prompt: str = "\n"
    """fixed prompt for the text sample written to TensorBoard at each evaluation"""
    sample_tokens: int = 200
    """bytes sampled from sample_prompt at each evaluation; 0 = no sample"""

    def __post_init__(self) -> None:
        non_negative("eval", self, "every", "sample_tokens")
        check(self.max_bytes == 0 or self.max_bytes >= 2,
               f"eval.max_bytes must be 0 (the whole split) or >= 2, one byte to predict from and one to predict "
               f"(got {self.max_bytes})")
        check(self.sample_tokens == 0 or self.sample_prompt != "",
               "eval.sample_prompt must not be empty (or set eval.sample_tokens=0)")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    """the run's folder: step files, last_checkpoint.pt, best_model.pt, config.yaml"""
    every: int = 1000
    """optimizer steps between checkpoints (and always at the end); 0 = only at the end"""
    keep_last: int = 3
    """step checkpoints kept besides best_model.pt"""
    verify: bool = True
    """at resume, check every byte against the CRC-32 saved with it (~0.2 s/GB); false: skip, for huge ones"""

    def __post_init__(self) -> None:
        non_negative("checkpoint", self, "every")
        positive("checkpoint", self, "keep_last")
        check(self.dir != "", "checkpoint.dir must not be empty")


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo"""
    timeout_s: int = 600
    """collective timeout: how long a rank waits in one collective (a slow save, a slow step) for the others"""
    join_timeout_s: int = 600
    """how long the ranks wait at start for every rank to join; past it each stops with one line saying how
    many joined (a rank refused at start, a wrong MASTER_ADDR). Raise it where nodes start minutes apart"""
    bucket_cap_mb: int = 25
    """ddp: gradient bucket size for the all-reduce (DistributedDataParallel bucket_cap_mb)"""
    gradient_as_bucket_view: bool = True
    """ddp: gradients are views into the buckets (saves one copy of the gradients)"""
    static_graph: bool = False
    """ddp: promise the same graph every step (DistributedDataParallel static_graph)"""
    strategy: str = "ddp"
    """ddp (every rank holds all weights, gradients and optimizer state) or fsdp (FSDP2: each rank
    holds 1/world_size of them; sharded checkpoint folders)"""

    @property
    def sharded(self) -> bool:
        """FSDP: the weights, gradients and optimizer state are split over the ranks (the one place that asks)."""
        return self.strategy == "fsdp"

    def __post_init__(self) -> None:
        one_of("distributed.backend", self.backend, ("auto", "nccl", "gloo"))
        one_of("distributed.strategy", self.strategy, ("ddp", "fsdp"))
        positive("distributed", self, "timeout_s", "join_timeout_s", "bucket_cap_mb")


@dataclass(frozen=True)
class LoggingConfig:
    dir: str = "logs"
    """text logs (train_<run>.log), metrics (train_<run>.metrics.jsonl) and TensorBoard runs (tensorboard/<run>/)"""
    wandb: bool = False
    """also send the scalars, the config and the text samples to Weights & Biases (pip install wandb)"""
    wandb_project: str = "bytegpt"
    """the W&B project the run is logged to"""
    wandb_name: str = ""
    """the run's name in W&B; empty = the run name of its log file"""
    wandb_mode: str = ""
    """online, offline (upload later with `wandb sync`) or disabled; empty = WANDB_MODE, else online"""

    def __post_init__(self) -> None:
        check(self.dir != "", "logging.dir must not be empty")
        one_of("logging.wandb_mode", self.wandb_mode, ("", "online", "offline", "disabled"))


@dataclass(frozen=True)
class HealthConfig:
    action: str = "skip"
    """what a loss spike or a non-finite loss/grad norm does: skip (drop that update), rollback (restore
    the in-memory snapshot, skip the data since it), stop (checkpoint, exit 2) or log (report only)"""
    window: int = 100
    """healthy steps of loss and grad norm history the detector compares each step with"""
    arm_after: int = 50
    """healthy steps seen before spikes are judged (non-finite steps are judged from step 1)"""
    loss_z: float = 6.0
    """a loss more than this many robust deviations (1.4826 MAD) above the window's median is a spike"""
    grad_norm_z: float = 20.0
    """the same for the grad norm (it is noisier than the loss); 0 = judge the loss alone"""
    min_rel_rise: float = 0.02
    """the deviation is at least this fraction of the median, so a flat, quiet window does not turn noise
    into spikes"""
    max_consecutive: int = 5
    """stop after this many events in a row (was train.max_nonfinite_steps)"""
    max_rollbacks: int = 3
    """rollback only: stop after this many rollbacks in the run"""
    snapshot_every: int = 50
    """rollback only: steps between in-memory snapshots (weights, optimizer, schedule, RNG; on CPU memory)"""
    rollback_lr_factor: float = 1.0
    """rollback only: multiply the LR by this for rollback_lr_steps steps after a rollback; 1 = unchanged"""
    rollback_lr_steps: int = 0
    """rollback only: for how many steps after a rollback the LR is lowered; 0 = not lowered"""
    oom_backoff: bool = True
    """on out-of-memory, retry the step with half the micro-batch and twice the accumulation (same global batch)"""
    memory_history: bool = False
    """CUDA: record allocation history and dump a snapshot next to the logs on out-of-memory (pytorch.org/memory_viz)"""

    def __post_init__(self) -> None:
        one_of("health.action", self.action, ("skip", "rollback", "stop", "log"))
        positive("health", self, "window", "loss_z", "max_consecutive", "snapshot_every")
        non_negative("health", self, "arm_after", "grad_norm_z", "min_rel_rise", "max_rollbacks",
                      "rollback_lr_steps")
        check(self.arm_after <= self.window, f"health.arm_after={self.arm_after} must not exceed "
               f"health.window={self.window}: the window holds the history it is armed on")
        check(0 < self.rollback_lr_factor <= 1, "health.rollback_lr_factor must be in (0, 1]")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        check(self.schedule.min_lr <= self.optim.lr,
               f"schedule.min_lr={self.schedule.min_lr} must not exceed optim.lr={self.optim.lr}")
        check(not self.distributed.sharded or self.train.precision != "fp16",
               "distributed.strategy=fsdp does not support train.precision=fp16 (FSDP2 has no sharded GradScaler); "
               "use train.precision=bf16 or fp32")
