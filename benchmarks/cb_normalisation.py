"""Loss scale of the two class-balanced normalisations (docs/FIDELITY.md, CB row) on the real CIFAR-10-LT
IF 100 batches of one epoch (the recipe's data, instance sampler, batch 128, last batch kept), and on the
CE of an untrained ResNet-32 on the first batch: weight_sum / batch = B / sum(w_y) of each batch.

    PYTHONPATH=$PWD python benchmarks/cb_normalisation.py       (needs ../shared/data; ~1 CPU-minute)
"""
import statistics
import torch
from longtail.config import load_config
from longtail.engine import builders
from longtail.engine.distributed import DistInfo
from longtail.functional import class_balanced_weights, normalize_weighted_losses
from longtail.registry import MODELS, load_all

load_all()
torch.manual_seed(0)
for overrides, label in (([], "full IF-100 training set"), (["data.val_fraction=0.2"], "short schedule's 80 % split")):
    config = load_config("configs/cifar10_lt/if100/class_balanced.yaml", overrides)
    bundle = builders.build_bundle(config)
    w = class_balanced_weights(bundle.train_counts, 0.9999)
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    sampler = builders.build_sampler(config, bundle, dist, "instance", {}, "data.sampler_params", config.seed)
    loader = builders.train_loader(config, bundle, sampler, builders.build_augment(config, bundle), torch.device("cpu"), 0)
    loader.set_epoch(0, 200)
    ratios = []
    for batch in loader:
        ratios.append(len(batch.targets) / float(w[batch.targets].sum()))
    print(f"{label}: N={len(bundle.train)}, steps={len(loader)}, counts={bundle.train_counts}")
    print(f"  weights={[round(x, 3) for x in w.tolist()]}")
    expected = sum(bundle.train_counts) / float((w * torch.tensor(bundle.train_counts, dtype=torch.float)).sum())
    print(f"  weight_sum/batch over epoch 0's {len(ratios)} batches: first {ratios[0]:.2f}, mean {statistics.mean(ratios):.2f},"
          f" min {min(ratios):.2f}, max {max(ratios):.2f}; N / sum_i w_(y_i) = {expected:.2f}")
    if not overrides:
        model = MODELS.build("resnet32", {}, num_classes=10, in_channels=3).train()
        batch = next(iter(loader))
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(model(batch.images).logits, batch.targets, reduction="none")
        weighted = ce * w[batch.targets]
        a = normalize_weighted_losses(weighted, w[batch.targets], "weight_sum").mean().item()
        b = normalize_weighted_losses(weighted, w[batch.targets], "batch").mean().item()
        print(f"  first batch, untrained ResNet-32 CE: weight_sum {a:.4f}, batch {b:.4f}, ratio {a / b:.2f}")
