"""``longtail export``: a trained run as one self-contained file (TorchScript or ONNX) that takes
images and returns logits. Normalisation is inside the graph; the resize rule, image size, class
names and the folded calibrator are in the file's metadata (TorchScript: the ``longtail.json`` extra
file; ONNX: ``metadata_props``). The export is loaded back and compared with the run's model."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtail.calibration.calibrators import Calibrator, TemperatureScaling, VectorScaling
from longtail.commands.common import UserError
from longtail.data.sources import EVAL_CROP_FRACTION
from longtail.engine.rundir import EXPORT_DIR, Exists, atomic_output, check_output
from longtail.models.finetune import merged_for_export
from longtail.runs import LoadedRun, find_calibrator, load_run

__all__ = ["cmd_export", "Deployable", "export_run", "load_export", "run_export", "metadata"]

METADATA_KEY = "longtail.json"
ONNX_MISSING = ("ONNX export needs the onnx and onnxruntime packages: pip install 'longtail[export]' "
                "(or use --format torchscript, which needs only torch)")


class Deployable(nn.Module):
    """float32 pixels (N, C, H, W) in 0..255, resized and centre-cropped as the metadata says ->
    logits (N, C); with a folded calibrator, logits whose softmax is the calibrated probability."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std_t))
        self.register_buffer("pixel_shift", -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t)
        self.register_buffer("logit_scale", torch.ones(1) if scale is None else scale.float())
        self.register_buffer("logit_bias", torch.zeros(1) if bias is None else bias.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(torch.addcmul(self.pixel_shift, images, self.pixel_scale)).logits
        return logits * self.logit_scale + self.logit_bias


def _folded(calibrator: Calibrator, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of a calibrator that is an affine map of the logits; others cannot be folded."""
    if isinstance(calibrator, TemperatureScaling):  # also KT-TS, a temperature fitted differently
        return torch.tensor([1.0 / calibrator.temperature]), torch.zeros(1)
    if isinstance(calibrator, VectorScaling):
        return calibrator.scale, calibrator.bias
    raise UserError(f"calibrator {name!r} ({calibrator.name}) is not an affine map of the logits, so it cannot be "
                    "folded into an exported model; export without --calibrated and apply it with "
                    "`longtail predict --calibrated`, or fit a foldable one (ts, kt_ts, vs)")


def metadata(run: LoadedRun, calibrator: str | None, fmt: str) -> dict[str, Any]:
    bundle = run.bundle
    return {
        "format": fmt, "run": str(run.run_dir), "checkpoint": str(run.file), "class_names": list(bundle.class_names),
        "input": f"float32 (N, {bundle.channels}, {bundle.image_size}, {bundle.image_size}) pixel values 0-255, "
                 f"{'RGB' if bundle.channels == 3 else 'grey'}; normalisation is inside the model",
        "image_size": bundle.image_size, "channels": bundle.channels,
        "resize": (f"none for an image that is image_size x image_size; other sizes: shorter side to "
                   f"round(image_size / {EVAL_CROP_FRACTION}), then centre crop image_size"),
        "mean": list(bundle.mean), "std": list(bundle.std),
        "output": "logits (N, num_classes); softmax gives probabilities",
        "calibrator": calibrator,
        "test_time_augmentation": (f"none in this file: the run is evaluated with eval.tta={run.config.eval.tta} "
                                   "(longtail eval/predict average the views); average this model's logits over the "
                                   "same views to match" if run.config.eval.tta != "none" else "none"),
    }


SUFFIXES = {"torchscript": (".pt", ".pth"), "onnx": (".onnx",)}
FORCE_HINT = "pass --force to replace it, or give another --out"


def export_run(run: LoadedRun, out: Path, fmt: str, calibrator_name: str | None = None,
               exist: Exists = "refuse") -> Path:
    """Write ``out`` (atomically; an existing file is refused, numbered or replaced as ``exist`` says)
    and return the file written; ``calibrator_name`` folds that fitted calibrator in. A failed export
    leaves neither a temporary file nor a folder made for it."""
    scale = bias = None
    if calibrator_name is not None:
        scale, bias = _folded(*reversed(find_calibrator(run.run_dir, calibrator_name, run.file)))
    if fmt == "onnx":
        try:
            import onnx
        except ImportError:
            raise UserError(ONNX_MISSING) from None
    # LoRA merged into the weights: the exported graph is the plain network
    model = merged_for_export(copy.deepcopy(run.model).cpu().float().eval())
    module = Deployable(model, run.bundle.mean, run.bundle.std, scale, bias).eval()
    size, channels = run.bundle.image_size, run.bundle.channels
    example = torch.rand(2, channels, size, size) * 255
    info = json.dumps(metadata(run, calibrator_name, fmt))
    with atomic_output(out, exist, FORCE_HINT) as output, torch.no_grad():
        tmp = str(output.tmp)
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example)
            torch.jit.save(traced, tmp, _extra_files={METADATA_KEY: info})
        else:
            torch.onnx.export(module, (example,), tmp, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
            graph = onnx.load(tmp)
            onnx.helper.set_model_props(graph, {METADATA_KEY: info})
            onnx.save(graph, tmp)
    return output.path


def load_export(path: Path) -> tuple[Any, dict[str, Any]]:
    """(a callable float32 images -> logits numpy/tensor, metadata) of an exported file."""
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError(ONNX_MISSING) from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        info = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        return (lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])), info
    files = {METADATA_KEY: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return (lambda images: module(images).detach()), json.loads(files[METADATA_KEY])


def run_export(run: LoadedRun, images: torch.Tensor, calibrator: Calibrator | None = None) -> torch.Tensor:
    """The run's own (calibrated) logits of uint8 ``images``, as the exported file should give them."""
    with torch.no_grad():
        logits = run.model(run.augment.normalize(images.to(run.dist_info.device))).logits.float().cpu()
    return logits if calibrator is None else calibrator.transform(logits).float()


def cmd_export(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).suffix.lower() not in SUFFIXES[args.format] and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} does not end in {' or '.join(SUFFIXES[args.format])}, the suffix of "
                        f"--format {args.format} (the suffix is how the file is read back); rename it or change "
                        "--format")
    exist: Exists = "replace" if args.force else ("refuse" if args.out else "number")
    if args.out:
        check_output(Path(args.out), exist, FORCE_HINT)
    run = load_run(Path(args.run), args.checkpoint)
    calibrator_name = None
    if args.calibrated or args.calibrator:
        calibrator_name = find_calibrator(run.run_dir, args.calibrator, run.file)[0]
    suffix = SUFFIXES[args.format][0]
    out = Path(args.out) if args.out else run.run_dir / EXPORT_DIR / f"model{'_' + calibrator_name if calibrator_name else ''}{suffix}"
    out = export_run(run, out, args.format, calibrator_name, exist)
    forward, _ = load_export(out)
    test = run.bundle.test
    if test.in_memory:  # check on real images: the first test batch
        images = test.images[:64]
        expected = run_export(run, images, find_calibrator(run.run_dir, calibrator_name)[1] if calibrator_name else None)
        got = forward(images.float())
        expected, got = expected.softmax(1), got.softmax(1)
        print(f"checked on {len(images)} test images: max |probability difference| {float((got - expected).abs().max()):.2e}")
    print(f"exported {args.format} to {out}")
    return 0
