"""The one training loop of longtail, for stage 1 and stage 2 alike.

What is trained comes in a ``TrainingJob`` (the model, the module a step calls, the loss, the batches,
the optimiser and schedule, the epochs); the ``Trainer`` owns everything around it that must be the
same for every stage: the progress bar, loss terms in the logs, the NaN stop, DDP, evaluation,
atomic checkpoints and exact ``--resume``. Methods plug in through the loss, the loader, the model
and their hooks (``on_epoch_start``, ``on_step_end``, ``on_epoch_end``; see docs/ARCHITECTURE.md),
never by editing this loop.

Exact resume needs no global RNG state: every random draw of an epoch (sampler, augmentation, file
crops, LADC's feature draws) comes from generators seeded with (seed, epoch), and fresh heads are
drawn before a checkpoint's weights replace them.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from longtail.config import Config
from longtail.data import DataBundle
from longtail.engine.checkpoint import load_checkpoint, run_checkpoint, save_checkpoint
from longtail.engine.distributed import DistInfo, all_reduce_sum, barrier
from longtail.engine.evaluation import EvalSettings, evaluate, final_scores
from longtail.engine.logging import LOG, RunLogger
from longtail.engine.precision import Precision
from longtail.engine.rundir import best_checkpoint, kept_checkpoint, last_checkpoint
from longtail.losses.terms import batch_loss
from longtail.metrics import summary
from longtail.types import Batch, ModelOutput

__all__ = ["NonFiniteLossError", "TrainingJob", "Trainer", "FitResult", "seed_everything", "call_hook"]

EPOCH_LOG_KEYS = ("top1", "many_top1", "medium_top1", "few_top1", "ece", "nll")


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept untouched."""


class BatchLoader(Protocol):
    def set_epoch(self, epoch: int, total_epochs: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed the global generator (fresh weights are drawn from it) and pick the cuDNN mode."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def call_hook(components: Iterable[Any], hook: str, *args: Any) -> None:
    for component in components:
        method = getattr(component, hook, None)
        if callable(method):
            method(*args)


@dataclass
class TrainingJob:
    """One stage to train, with every setting the trainer uses: whoever builds the job decides them
    (``builders.stage1_job`` from ``train.*``/``data.*``, ``Stage2Context.train`` from ``stage2.*``); the
    trainer reads no config.

    ``model`` is what is checkpointed and evaluated; ``net`` is the module a step calls on
    ``batch.images`` (the model itself in stage 1; in stage 2 a view that runs the frozen backbone, or
    reads cached features, and the trainable heads). ``precision``: autocast dtype and memory format of
    the steps; ``evaluation``: how the model is scored (``engine.evaluation``); ``batch_size``: per process
    (counts the images of an epoch when the loader does not say); ``grad_clip`` (None or 0: off),
    ``compile`` (``torch.compile`` of ``net``), ``log_interval`` (steps between device syncs and log
    updates). ``checkpoint_extra`` adds what a checkpoint needs to be rebuilt (stage 2: the head specs).
    ``label`` names the stage in logs and progress bars. ``evaluate_at_end=False`` leaves the final
    evaluation to the caller (stage 2 evaluates after folding its heads)."""

    label: str
    model: nn.Module
    net: nn.Module
    loss_fn: nn.Module
    loader: BatchLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    precision: Precision
    evaluation: EvalSettings
    batch_size: int
    grad_clip: float | None = None
    compile: bool = False
    log_interval: int = 50
    stop_at_epoch: int | None = None
    keep_epochs: tuple[int, ...] = ()  # also keep the checkpoint of these epochs' ends (1-based)
    select: str = "last"
    eval_every: int = 1
    checkpoint_every: int = 1
    hooked: list[Any] = field(default_factory=list)
    checkpoint_extra: Callable[[], dict[str, Any]] = dict
    broadcast_buffers: bool = True
    evaluate_at_end: bool = True


@dataclass
class FitResult:
    """What ``Trainer.fit`` returns: ``results`` (what metrics.json holds) and the last epoch's test
    predictions (for the plots), or ``stopped_at_epoch`` when ``stop_at_epoch`` cut the run short."""

    results: dict[str, Any]
    test_outputs: dict[str, torch.Tensor] | None = None
    stopped_at_epoch: int | None = None


class Trainer:
    """Runs a ``TrainingJob`` in ``run_dir`` (checkpoints, metrics.csv, TensorBoard) on ``bundle``.
    ``config`` is only recorded in the checkpoints (what the run was trained with); every setting of
    the training comes from the job."""

    def __init__(self, config: Config, job: TrainingJob, bundle: DataBundle, run_dir: Path, dist_info: DistInfo,
                 resume_from: Path | None = None, started_from: Path | None = None) -> None:
        self.config, self.job, self.bundle = config, job, bundle
        self.run_dir, self.dist, self.device = run_dir, dist_info, dist_info.device
        self.counts = bundle.train_counts
        self.precision = job.precision
        self.amp_dtype, self.channels_last = self.precision.amp_dtype, self.precision.channels_last
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.net = job.net
        if job.compile:
            self.net = torch.compile(self.net)
        if dist_info.distributed:
            self.net = DistributedDataParallel(self.net, broadcast_buffers=job.broadcast_buffers,
                                               device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.best_weights: dict[str, torch.Tensor] | None = None
        if resume_from is not None or started_from is not None:
            self._load_state(load_checkpoint(resume_from or started_from, map_location=self.device),
                             "resumed from" if resume_from is not None else f"started from {started_from},")
        self.logger = RunLogger(run_dir, enabled=dist_info.is_main)
        if started_from is not None:  # a new run begun from another's checkpoint: its epochs are this run's too
            self._lr_from_this_schedule()
            for row in self.history:
                self.logger.log_epoch(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})

    # ------------------------------------------------------------- checkpoint
    def _state(self, epoch: int) -> dict[str, Any]:
        job = self.job
        return run_checkpoint(job.model, self.config, epoch, optimizer=job.optimizer.state_dict(),
                              scheduler=job.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                              loss=job.loss_fn.state_dict(), history=self.history, best=self.best,
                              **job.checkpoint_extra())

    def _load_state(self, state: dict[str, Any], how: str) -> None:
        job = self.job
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        job.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        job.loss_fn.load_state_dict(state["loss"])
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.start_epoch = int(state["epoch"]) + 1
        LOG.info(f"{job.label}: {how} epoch {state['epoch'] + 1}; continuing at epoch {self.start_epoch + 1}")

    def _lr_from_this_schedule(self) -> None:
        """The optimiser state of a start holds the lr the *source's* schedule set for the next step (a
        decay at the start epoch would be the source's for a whole epoch): set it from this run's schedule."""
        scheduler = self.job.scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(f"a start needs a per-step LambdaLR schedule, not {type(scheduler).__name__}")
        lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(self.job.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() reports, as a step would have set it

    def _save(self, epoch: int, is_best: bool, keep: bool = False) -> None:
        if not self.dist.is_main:
            return
        state = self._state(epoch)
        save_checkpoint(state, last_checkpoint(self.run_dir))
        if is_best:
            save_checkpoint(state, best_checkpoint(self.run_dir))
        if keep:
            save_checkpoint(state, kept_checkpoint(self.run_dir, epoch + 1))

    # ------------------------------------------------------------------ loop
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        job = self.job
        self.net.train()
        call_hook(job.hooked, "on_epoch_start", epoch, job.epochs)
        job.loader.set_epoch(epoch, job.epochs)
        steps = len(job.loader)
        world = self.dist.world_size
        # images of the epoch over all ranks (the last batch may be partial: data.drop_last=false)
        epoch_images = getattr(job.loader, "samples_per_epoch", steps * self._images_per_step() // world) * world
        images_seen = 0
        # running sums stay on the device: the step loop syncs with the host once per log interval
        loss_sum = torch.zeros((), device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        bar = tqdm(total=epoch_images, unit="img", unit_scale=True, leave=False,
                   desc=f"{job.label} epoch {epoch + 1}/{job.epochs}", disable=not self.dist.is_main,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
        start = time.perf_counter()
        step_lr = job.optimizer.param_groups[0]["lr"]
        for step, batch in enumerate(job.loader):
            images = batch.images
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                output: ModelOutput = self.net(images)
            # the loss (and every statistic a hook stores from the output) in float32: under bfloat16
            # autocast log_softmax and friends would otherwise run on 8-bit mantissas
            output = output.float32() if self.amp_dtype is not None else output
            loss, terms = batch_loss(job.loss_fn, output, batch)
            job.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if job.grad_clip:
                self.scaler.unscale_(job.optimizer)
                torch.nn.utils.clip_grad_norm_(job.model.parameters(), job.grad_clip)
            self.scaler.step(job.optimizer)
            self.scaler.update()
            step_lr = job.optimizer.param_groups[0]["lr"]  # what this step trained with; the scheduler moves on
            job.scheduler.step()
            loss_sum += loss.detach()
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach().float()
            if job.hooked:
                call_hook(job.hooked, "on_step_end", _detached(output), batch)
            step_images = len(batch.targets) * world
            images_seen += step_images
            bar.update(step_images)
            if (step + 1) % job.log_interval == 0 or step + 1 == steps:
                mean_loss = float(loss_sum) / (step + 1)
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(self._nan_message(mean_loss, epoch, step))
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{step_lr:.4g}",
                                **{name: f"{float(value) / (step + 1):.4f}" for name, value in term_sums.items()})
        bar.close()
        elapsed = time.perf_counter() - start
        call_hook(job.hooked, "on_epoch_end", epoch)
        denominator = max(steps, 1)
        row = {"train_loss": float(all_reduce_sum(loss_sum.clone())) / world / denominator}
        for name, value in term_sums.items():
            row[f"train_{name}"] = float(all_reduce_sum(value.clone())) / world / denominator
        # the lr of the epoch's last step (a step schedule's lr of the whole epoch), not the next step's
        return {**row, "lr": step_lr, "epoch_seconds": elapsed,
                "images_per_second": images_seen / max(elapsed, 1e-9)}

    def _images_per_step(self) -> int:
        batch_size = getattr(self.job.loader, "batch_size", self.job.batch_size)
        return batch_size * self.dist.world_size

    def _nan_message(self, value: float, epoch: int, step: int) -> str:
        last = last_checkpoint(self.run_dir)
        kept = (f"The last good checkpoint is {last} (end of epoch {epoch})." if last.exists()
                else "No checkpoint was written yet (it failed in the first epoch).")
        return (f"{self.job.label}: loss became {value} at epoch {epoch + 1}, step {step + 1}; stopped. {kept} "
                "Lower the learning rate, enable train.grad_clip, or use train.amp=none/bf16 instead of fp16.")

    def evaluate(self, split: str, keep_features: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        result = evaluate(self.job.model, getattr(self.bundle, split), self.job.evaluation, self.dist, self.counts,
                          keep_features=keep_features)
        assert result.metrics is not None
        return result.metrics, result.outputs

    def _epoch_scores(self, epoch: int) -> dict[str, Any]:
        job = self.job
        last_epoch = epoch + 1 == job.epochs and job.evaluate_at_end
        periodic = bool(job.eval_every) and (epoch + 1) % job.eval_every == 0
        scores: dict[str, Any] = {}
        if self.bundle.val is not None and (periodic or last_epoch or job.select == "val"):
            scores["val"] = self.evaluate("val")[0]
        if last_epoch or job.select == "test" or periodic:
            scores["test"] = self.evaluate("test")[0]
        return scores

    def _is_best(self, epoch: int, scores: dict[str, Any]) -> bool:
        select = self.job.select
        if select == "last":
            return False
        value = scores[select]["top1"]
        if not self.best or value > self.best["top1"]:
            self.best = {"epoch": epoch, "top1": value, "selected_on": select}
            # every rank keeps the weights, so evaluating 'best' needs no shared file system
            self.best_weights = {k: v.detach().clone() for k, v in self.job.model.state_dict().items()}
            return True
        return False

    def fit(self) -> FitResult:
        job = self.job
        for epoch in range(self.start_epoch, job.epochs):
            stats = self._train_epoch(epoch)
            scores = self._epoch_scores(epoch)
            is_best = self._is_best(epoch, scores)
            row = {**stats, **{f"{split}_{k}": v for split, m in scores.items() for k, v in m.items()
                               if k in EPOCH_LOG_KEYS and v is not None}}
            self.history.append({"epoch": epoch + 1, **row})
            self.logger.log_epoch(epoch + 1, row)
            keep = epoch + 1 in job.keep_epochs
            if (epoch + 1) % job.checkpoint_every == 0 or epoch + 1 == job.epochs or is_best or keep:
                self._save(epoch, is_best, keep)
            terms = " ".join(f"{k.removeprefix('train_')} {v:.4f}" for k, v in stats.items()
                             if k.startswith("train_") and k != "train_loss")
            line = (f"{job.label} epoch {epoch + 1}/{job.epochs} loss {stats['train_loss']:.4f}"
                    f"{f' ({terms})' if terms else ''} lr {stats['lr']:.4g} {stats['images_per_second']:.0f} img/s")
            if "test" in scores:
                line += f" | test {summary(scores['test'])}"
            if "val" in scores:
                line += f" | val top-1 {100 * scores['val']['top1']:.2f}"
            LOG.info(line)
            if job.stop_at_epoch is not None and epoch + 1 >= job.stop_at_epoch and epoch + 1 < job.epochs:
                if (epoch + 1) % job.checkpoint_every:
                    self._save(epoch, False)
                LOG.info(f"{job.label}: stopped after epoch {epoch + 1} as asked (stop_at_epoch); "
                         f"`--resume {self.run_dir}` continues")
                barrier()
                self.logger.close()
                return FitResult(results={"stopped_at_epoch": epoch + 1}, stopped_at_epoch=epoch + 1)
        barrier()
        return self.finish()

    def finish(self) -> FitResult:
        """Final metrics of the last (and, when selected on val/test, the best) epoch."""
        job = self.job
        if not job.evaluate_at_end:
            self.logger.close()
            return FitResult(results={"history": self.history})
        results: dict[str, Any] = {"selection": job.select}
        if job.select == "test":
            results["warning"] = ("'best' was selected on the test set (the seeds' practice); "
                                  "its test numbers are optimistic. Compare 'last' for an unbiased estimate.")
        results["last"], last_outputs = final_scores(job.model, self.bundle, job.evaluation, self.dist, job.epochs)
        last_metrics = results["last"]["test"]
        if self.best:
            if self.best_weights is None:  # resumed after the best epoch: its weights are on disk
                self.best_weights = load_checkpoint(best_checkpoint(self.run_dir), self.device)["model"]
            current = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
            job.model.load_state_dict(self.best_weights)
            results["best"] = {"epoch": self.best["epoch"] + 1, "selected_on": self.best["selected_on"],
                               "test": self.evaluate("test")[0]}
            job.model.load_state_dict(current)
        LOG.info(f"{job.label}, last epoch: {summary(last_metrics)}")
        if "best" in results:
            LOG.info(f"best epoch {results['best']['epoch']} (on {results['best']['selected_on']}): "
                     f"{summary(results['best']['test'])}")
        self.logger.close()
        return FitResult(results=results, test_outputs=last_outputs)


def _detached(output: ModelOutput) -> ModelOutput:
    return ModelOutput(
        logits=output.logits.detach(), features=output.features.detach(),
        expert_logits=None if output.expert_logits is None else output.expert_logits.detach(),
        expert_features=None if output.expert_features is None else output.expert_features.detach(),
        intermediate=None, extras={})
