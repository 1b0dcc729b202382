"""Precision defaults: ``train.amp=auto`` / ``train.channels_last=auto`` follow the hardware, what was
chosen is recorded, and under bfloat16 autocast the loss, the stored statistics and the evaluation
metrics still see float32."""
import json

import pytest
import torch

from longtail.commands.train import train_stage1
from longtail.config import load_config
from longtail.engine import precision as precision_module
from longtail.engine.distributed import init_distributed
from longtail.engine.precision import resolve_precision
from longtail.types import ModelOutput

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
DIGITS = ["device=cpu", "train.epochs=2", "model.params.hidden=[32]", "train.eval_every=0", "data.batch_size=64"]


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend to be a CPU with the given flags (the decision is a pure function of them)."""
    def use(*flags: str) -> None:
        monkeypatch.setattr(precision_module, "cpu_features", lambda: frozenset(flags))
    return use


def test_auto_on_a_cpu_with_native_bfloat16_is_bf16_channels_last(cpu_flags):
    cpu_flags("avx512", "avx512_bf16")
    chosen = resolve_precision("auto", "auto", CPU)
    assert chosen.amp_dtype == torch.bfloat16 and chosen.channels_last
    assert "avx512_bf16" in chosen.label and "channels_last" in chosen.label


@pytest.mark.parametrize("flags, dtype, channels_last", [
    ((), None, False),                                    # an AVX2-only CPU keeps float32 NCHW
    (("avx512",), None, True),                            # AVX-512 without BF16 (Skylake-X, Zen 4 has BF16)
    (("avx512", "amx_bf16"), torch.bfloat16, True),       # AMX alone is enough
])
def test_auto_on_other_cpus(cpu_flags, flags, dtype, channels_last):
    cpu_flags(*flags)
    chosen = resolve_precision("auto", "auto", CPU)
    assert (chosen.amp_dtype, chosen.channels_last) == (dtype, channels_last)


def test_explicit_settings_win_over_the_hardware(cpu_flags):
    cpu_flags("avx512", "avx512_bf16", "amx_bf16")
    assert resolve_precision("none", "no", CPU).amp_dtype is None
    assert not resolve_precision("none", "no", CPU).channels_last
    assert resolve_precision("bf16", "yes", CPU).amp_dtype == torch.bfloat16
    cpu_flags()
    assert resolve_precision("bf16", "yes", CPU).channels_last
    assert resolve_precision("auto", "auto", CUDA).amp_dtype == torch.bfloat16  # CUDA unchanged


def test_model_output_float32_is_differentiable_and_complete():
    logits = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    output = ModelOutput(logits=logits, features=torch.randn(4, 2, dtype=torch.bfloat16),
                         expert_logits=torch.randn(2, 4, 3, dtype=torch.bfloat16),
                         extras={"branch": torch.ones(2, dtype=torch.bfloat16), "alpha": 0.5})
    up = output.float32()
    assert {up.logits.dtype, up.features.dtype, up.expert_logits.dtype, up.extras["branch"].dtype} == {torch.float32}
    assert up.extras["alpha"] == 0.5
    up.logits.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def _train_digits(folder, *overrides: str) -> dict:
    config = load_config(None, [*DIGITS, *overrides])
    folder.mkdir(parents=True)
    return train_stage1(config, folder, init_distributed("cpu"))


def test_under_bf16_the_model_runs_bf16_and_the_loss_sees_float32(tmp_path, one_thread, monkeypatch):
    from longtail.engine import builders, trainer
    loss_dtypes: list[torch.dtype] = []
    layer_dtypes: list[torch.dtype] = []
    batch_loss, build_model = trainer.batch_loss, builders.build_model

    def recording_loss(loss_fn, output, batch):
        loss_dtypes.append(output.logits.dtype)
        return batch_loss(loss_fn, output, batch)

    def recording_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        layer.register_forward_hook(lambda module, inputs, out: layer_dtypes.append(out.dtype))
        return model

    monkeypatch.setattr(trainer, "batch_loss", recording_loss)
    monkeypatch.setattr(builders, "build_model", recording_model)
    results = _train_digits(tmp_path / "run", "train.amp=bf16")
    assert loss_dtypes and set(loss_dtypes) == {torch.float32}
    assert torch.bfloat16 in layer_dtypes
    assert 0.5 < results["last"]["test"]["top1"] <= 1


def test_the_choice_is_in_env_json(tmp_path, one_thread):
    from longtail.cli import main
    assert main(["train", *DIGITS, f"output_dir={tmp_path}", "name=run", "train.amp=bf16",
                 "train.channels_last=no"]) == 0
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["precision"].startswith("bfloat16 autocast, NCHW")


def test_bf16_and_float32_train_digits_alike(tmp_path, one_thread):
    """Two epochs of Digits-LT in each precision end within a few points (the 3-seed CIFAR-10-LT
    parity study is in benchmarks/RESULTS.md)."""
    fp32 = _train_digits(tmp_path / "fp32", "train.amp=none", "train.channels_last=no")["last"]["test"]
    bf16 = _train_digits(tmp_path / "bf16", "train.amp=bf16", "train.channels_last=yes")["last"]["test"]
    assert abs(fp32["top1"] - bf16["top1"]) < 0.05
    assert abs(fp32["ece"] - bf16["ece"]) < 0.05
