"""The generic training loop. Methods plug in through the loss, the sampler, the model and their
hooks (``on_epoch_start``, ``on_step_end``, ``on_epoch_end``; see docs/ARCHITECTURE.md) — never by
editing this loop."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from longtail.config import Config
from longtail.engine import builders
from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
from longtail.engine.distributed import DistInfo, all_reduce_sum, barrier
from longtail.engine.evaluate import compute_metrics, predict, summary
from longtail.engine.logging import LOG, RunLogger
from longtail.engine.optim import build_optimizer, build_scheduler
from longtail.registry import LOSSES, SAMPLERS
from longtail.types import Batch, ModelOutput


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept untouched."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def call_hook(components: list[Any], hook: str, *args: Any) -> None:
    for component in components:
        method = getattr(component, hook, None)
        if callable(method):
            method(*args)


def mixed_loss(loss_fn: torch.nn.Module, output: ModelOutput, batch: Batch) -> torch.Tensor:
    """Batch mean of the per-sample loss; a mixed batch (mixup, Remix, BBN) weighs its two label sets.

    A model that mixes its inputs itself (BBN) reports the weight in ``output.extras["mix_weight"]``.
    """
    per_sample = loss_fn(output, batch.targets, batch)
    weight = batch.mix_weight if batch.mix_weight is not None else output.extras.get("mix_weight")
    if batch.mix_targets is not None:
        if weight is None:
            raise ValueError("a batch with mix_targets needs a mix weight (from the augmentation or the model)")
        weight = torch.as_tensor(weight, device=per_sample.device, dtype=per_sample.dtype)
        per_sample = weight * per_sample + (1 - weight) * loss_fn(output, batch.mix_targets, batch)
    return per_sample.mean()


class PairedLoader:
    """Appends a batch from a second sampler to each batch (BBN's uniform + reversed branches)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self.first.set_epoch(epoch, total_epochs)
        self.second.set_epoch(epoch, total_epochs)

    def __len__(self) -> int:
        return min(len(self.first), len(self.second))

    def __iter__(self):
        for a, b in zip(self.first, self.second):
            yield Batch(images=torch.cat([a.images, b.images]), targets=a.targets, indices=a.indices,
                        mix_targets=b.targets)


class Trainer:
    """Stage-1 (representation) training of one config in one run directory."""

    def __init__(self, config: Config, run_dir: Path, dist_info: DistInfo, resume_from: Path | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.dist = dist_info
        self.device = dist_info.device
        seed_everything(config.seed, config.train.deterministic)

        self.bundle = builders.build_bundle(config)
        self.counts = self.bundle.train_counts
        self.model = builders.build_model(config, self.bundle, self.device)
        self.loss_fn = LOSSES.build(config.loss.name, config.loss.params, where="loss.params",
                                    class_counts=self.counts, num_classes=self.bundle.num_classes,
                                    num_samples=len(self.bundle.train.targets)).to(self.device)
        self.augment = builders.build_augment(config, self.bundle)
        self.loader, self.samplers = self._train_loader()
        self.amp_dtype = builders.amp_dtype(config, self.device)
        self.channels_last = builders.use_channels_last(config, self.device)

        self.optimizer = build_optimizer(self.model.parameters(), config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, len(self.loader), config.train.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.net: torch.nn.Module = self.model
        if config.train.compile:
            self.net = torch.compile(self.net)
        if dist_info.distributed:
            self.net = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.best_weights: dict[str, torch.Tensor] | None = None
        if resume_from is not None:
            self._load_state(load_checkpoint(resume_from, map_location=self.device))
        self.logger = RunLogger(run_dir, enabled=dist_info.is_main)

    # ----------------------------------------------------------------- set-up
    def _sampler(self, name: str, params: dict[str, Any], where: str) -> Any:
        return SAMPLERS.build(name, params, where=where, targets=self.bundle.train.targets,
                              num_classes=self.bundle.num_classes, seed=self.config.seed,
                              rank=self.dist.rank, world_size=self.dist.world_size)

    def _train_loader(self) -> tuple[Any, list[Any]]:
        from longtail.data.loaders import TrainLoader
        data = self.config.data
        samplers = [self._sampler(data.sampler, data.sampler_params, "data.sampler_params")]
        if data.pair_sampler:
            samplers.append(self._sampler(data.pair_sampler, {}, "data.pair_sampler"))
        loaders = [TrainLoader(self.bundle.train, sampler, data.batch_size, self.augment, self.device,
                               seed=self.config.seed + 7919 * i, num_workers=data.num_workers,
                               decode_on_device=data.decode_on_device)
                   for i, sampler in enumerate(samplers)]
        loader = loaders[0] if len(loaders) == 1 else PairedLoader(*loaders)
        return loader, samplers

    def _hooked(self) -> list[Any]:
        return [self.model, self.loss_fn, *self.samplers]

    # ------------------------------------------------------------- checkpoint
    def _state(self, epoch: int) -> dict[str, Any]:
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "config": self.config.model_dump(mode="json"),
            "history": self.history,
            "best": self.best,
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        LOG.info(f"resumed from epoch {state['epoch'] + 1}; continuing at epoch {self.start_epoch + 1}")

    def _save(self, epoch: int, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        folder = self.run_dir / "checkpoints"
        state = self._state(epoch)
        save_checkpoint(state, folder / "last.pt")
        if is_best:
            save_checkpoint(state, folder / "best.pt")

    # ------------------------------------------------------------------ loop
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        self.net.train()
        call_hook(self._hooked(), "on_epoch_start", epoch, cfg.train.epochs)
        self.loader.set_epoch(epoch, cfg.train.epochs)
        steps = len(self.loader)
        images_per_step = cfg.data.batch_size * self.dist.world_size
        loss_sum = torch.zeros((), device=self.device)
        bar = tqdm(total=steps * images_per_step, unit="img", unit_scale=True, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not self.dist.is_main,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
        start = time.perf_counter()
        for step, batch in enumerate(self.loader):
            images = batch.images
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                output: ModelOutput = self.net(images)
                loss = mixed_loss(self.loss_fn, output, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.train.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss_sum += loss.detach()
            call_hook(self._hooked(), "on_step_end", _detached(output), batch)
            bar.update(images_per_step)
            if (step + 1) % cfg.train.log_interval == 0 or step + 1 == steps:
                # the only host-device sync of the step loop, once per log interval
                mean_loss = float(loss_sum) / (step + 1)
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"loss became {mean_loss} at epoch {epoch + 1}, step {step + 1}; stopped. The last good "
                        f"checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'} (end of epoch {epoch}). "
                        "Lower optim.lr, enable train.grad_clip, or use train.amp=none/bf16 instead of fp16.")
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.4g}")
        bar.close()
        elapsed = time.perf_counter() - start
        call_hook(self._hooked(), "on_epoch_end", epoch)
        total_loss = all_reduce_sum(loss_sum.clone()) / self.dist.world_size
        return {"train_loss": float(total_loss) / max(steps, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_seconds": elapsed, "images_per_second": steps * images_per_step / max(elapsed, 1e-9)}

    def evaluate(self, split: str, keep_features: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        imageset = getattr(self.bundle, split)
        loader = builders.eval_loader(self.config, imageset, self.augment, self.dist)
        outputs = predict(self.model, loader, self.dist, len(imageset.targets), self.amp_dtype, keep_features)
        metrics = compute_metrics(outputs["logits"], outputs["targets"], self.counts, outputs.get("expert_logits"))
        return metrics, outputs

    def _epoch_scores(self, epoch: int) -> dict[str, Any]:
        cfg = self.config.train
        last_epoch = epoch + 1 == self.config.train.epochs
        scores: dict[str, Any] = {}
        if self.bundle.val is not None:
            scores["val"] = self.evaluate("val")[0]
        if last_epoch or cfg.select == "test" or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            scores["test"] = self.evaluate("test")[0]
        return scores

    def _is_best(self, epoch: int, scores: dict[str, Any]) -> bool:
        select = self.config.train.select
        if select == "last":
            return False
        value = scores[select]["top1"]
        if not self.best or value > self.best["top1"]:
            self.best = {"epoch": epoch, "top1": value, "selected_on": select}
            # every rank keeps the weights, so evaluating 'best' needs no shared file system
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return True
        return False

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        LOG.info(f"run {self.run_dir} | {len(self.bundle.train.targets)} training images in "
                 f"{self.bundle.num_classes} classes (largest {max(self.counts)}, smallest {min(self.counts)}) | "
                 f"model {cfg.model.name} | loss {cfg.loss.name} | device {self.device}"
                 f"{f' x{self.dist.world_size}' if self.dist.distributed else ''}")
        for epoch in range(self.start_epoch, cfg.train.epochs):
            stats = self._train_epoch(epoch)
            scores = self._epoch_scores(epoch)
            is_best = self._is_best(epoch, scores)
            row = {**stats, **{f"{split}_{k}": v for split, m in scores.items()
                               for k, v in m.items() if k in ("top1", "many_top1", "medium_top1", "few_top1", "ece", "nll")
                               and v is not None}}
            self.history.append({"epoch": epoch + 1, **row})
            self.logger.log_epoch(epoch + 1, row)
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs or is_best:
                self._save(epoch, is_best)
            line = (f"epoch {epoch + 1}/{cfg.train.epochs} loss {stats['train_loss']:.4f} "
                    f"lr {stats['lr']:.4g} {stats['images_per_second']:.0f} img/s")
            if "test" in scores:
                line += f" | test {summary(scores['test'])}"
            if "val" in scores:
                line += f" | val top-1 {100 * scores['val']['top1']:.2f}"
            LOG.info(line)
            if cfg.train.stop_at_epoch is not None and epoch + 1 >= cfg.train.stop_at_epoch < cfg.train.epochs:
                if (epoch + 1) % cfg.train.checkpoint_every:
                    self._save(epoch, False)
                LOG.info(f"stopped after epoch {epoch + 1} as train.stop_at_epoch asks; continue with "
                         f"`longtail train --resume {self.run_dir}`")
                barrier()
                self.logger.close()
                return {"stopped_at_epoch": epoch + 1}
        barrier()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Final metrics of the last (and, when selected on val/test, the best) checkpoint + plots."""
        results: dict[str, Any] = {"selection": self.config.train.select}
        if self.config.train.select == "test":
            results["warning"] = ("'best' was selected on the test set (the seeds' practice); "
                                  "its test numbers are optimistic. Compare 'last' for an unbiased estimate.")
        last_metrics, last_outputs = self.evaluate("test")
        results["last"] = {"epoch": self.config.train.epochs, "test": last_metrics}
        if self.bundle.val is not None:
            results["last"]["val"] = self.evaluate("val")[0]
        if self.best:
            if self.best_weights is None:  # resumed after the best epoch: its weights are on disk
                self.best_weights = load_checkpoint(self.run_dir / "checkpoints" / "best.pt", self.device)["model"]
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.best_weights)
            results["best"] = {"epoch": self.best["epoch"] + 1, "selected_on": self.best["selected_on"],
                               "test": self.evaluate("test")[0]}
            self.model.load_state_dict(current)
        if self.dist.is_main:
            write_results(self.run_dir, results, last_outputs, self.counts, last_metrics)
            LOG.info(f"last epoch: {summary(last_metrics)}")
            if "best" in results:
                LOG.info(f"best epoch {results['best']['epoch']} (on {results['best']['selected_on']}): "
                         f"{summary(results['best']['test'])}")
            LOG.info(f"results in {self.run_dir}")
        self.logger.close()
        return results


def _detached(output: ModelOutput) -> ModelOutput:
    return ModelOutput(
        logits=output.logits.detach(), features=output.features.detach(),
        expert_logits=None if output.expert_logits is None else output.expert_logits.detach(),
        expert_features=None if output.expert_features is None else output.expert_features.detach(),
        intermediate=None, extras={})


def write_results(out_dir: Path, results: dict[str, Any], outputs: dict[str, torch.Tensor],
                  train_counts: list[int], metrics: dict[str, Any]) -> None:
    """metrics.json plus the plots people look at: per-class accuracy against class size, and
    reliability diagrams (overall and per shot group)."""
    from longtail.calibration.diagrams import reliability_diagram, reliability_diagrams_by_group
    from longtail.report.plots import per_class_accuracy_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    per_class_accuracy_plot(metrics["per_class_top1"], train_counts, plots / "per_class_accuracy.png",
                            title=f"per-class top-1 (overall {100 * metrics['top1']:.2f}%)")
    reliability_diagram(outputs["logits"], outputs["targets"], plots / "reliability.png", title="test, last epoch")
    reliability_diagrams_by_group(outputs["logits"], outputs["targets"], train_counts,
                                  plots / "reliability_by_group.png")
