"""The IKL plug-in loss: what it records per sample, the CKS mask, top-k storage, checkpoints, DDP."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import longtail.losses  # noqa: F401  (registers the losses)
from longtail.registry import LOSSES
from longtail.types import Batch, ModelOutput

N, C, D, TAU = 8, 4, 3, 2.0
COUNTS = [4, 2, 1, 1]
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])


def build(**params):
    return LOSSES.build("ikl", params, where="loss.params", class_counts=COUNTS, num_classes=C, num_samples=N)


def epoch_zero_records(seed=0):
    """Logits and features of every training sample in the first epoch; samples 1 and 5 are wrong."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=g)
    logits[torch.arange(N), LABELS] += 3.0
    logits[1] = torch.tensor([0.0, 5.0, 0.5, -0.5])
    logits[5] = torch.tensor([5.0, 0.0, 1.0, -1.0])
    features = torch.rand(N, D, generator=g) + LABELS[:, None] * torch.tensor([1.0, 0.0, -0.3])
    return logits, features


def record_epoch(loss, logits, features, epoch=0, total=2, order=(range(0, 4), range(4, N))):
    loss.on_epoch_start(epoch, total)
    for part in order:
        idx = torch.tensor(list(part))
        loss.on_step_end(ModelOutput(logits=logits[idx], features=features[idx]),
                         Batch(images=torch.zeros(len(idx), 1, 1, 1), targets=LABELS[idx], indices=idx))
    loss.on_epoch_end(epoch)


def second_epoch_batch():
    idx = torch.tensor([5, 2, 7, 1, 0])
    logits = torch.randn(len(idx), C, generator=torch.Generator().manual_seed(1))
    return idx, logits, Batch(images=torch.zeros(len(idx), 1, 1, 1), targets=LABELS[idx], indices=idx)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_first_epoch_trains_with_the_base_loss_only():
    loss = build(alpha_schedule="equal")  # alpha would be 0.5 from the start, but nothing is stored yet
    loss.on_epoch_start(0, 2)
    idx, logits, batch = second_epoch_batch()
    output = ModelOutput(logits=logits, features=torch.zeros(len(idx), D))
    expected = F.cross_entropy(logits, batch.targets, reduction="none")
    torch.testing.assert_close(loss(output, batch.targets, batch).total, expected)


def test_loss_after_one_epoch_matches_numpy():
    logits0, features0 = epoch_zero_records()
    loss = build(topk=None, tau=TAU, alpha_schedule="linear")
    record_epoch(loss, logits0, features0)
    loss.on_epoch_start(1, 2)  # linear: alpha = 1/2
    idx, logits, batch = second_epoch_batch()
    result = loss(ModelOutput(logits=logits, features=torch.zeros(len(idx), D)), batch.targets, batch)

    # last epoch's softened predictions, stored in fp16; CKS = previously correct samples
    prev = np.exp(np_log_softmax(logits0.numpy() / TAU)).astype(np.float16).astype(np.float64)[idx]
    correct = (logits0.argmax(1) == LABELS).numpy()[idx]
    assert correct.tolist() == [False, True, True, False, True]
    log_q = np_log_softmax(logits.numpy() / TAU)
    kl = TAU ** 2 * (prev * (np.log(prev) - log_q)).sum(1)
    iur = np.where(correct, kl, 0.0) * len(idx) / correct.sum()
    # class medians of last epoch's (fp16) features -> cosine -> soft labels
    feats = features0.numpy().astype(np.float16).astype(np.float64)
    centers = np.stack([np.median(feats[LABELS.numpy() == c], axis=0) for c in range(C)])
    unit = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    sim = np.clip(unit @ unit.T, 0, None)
    np.fill_diagonal(sim, 1.0)
    soft = (np.eye(C) + sim / sim.sum(1, keepdims=True)) / 2
    y = batch.targets.numpy()
    icl = -(soft[y] * np_log_softmax(logits.numpy() / TAU)).sum(1)  # icl_softened (the default): eq. 1's p
    ce = -np_log_softmax(logits.numpy())[np.arange(len(y)), y]
    expected = 0.5 * ce + 0.5 * (iur + icl)
    np.testing.assert_allclose(result.total.numpy(), expected, rtol=1e-4)
    for name, part in (("base", 0.5 * ce), ("iur", 0.5 * iur), ("icl", 0.5 * icl)):  # the logged terms
        np.testing.assert_allclose(result.terms[name].numpy(), part, rtol=1e-4, atol=1e-7)
    # eq. 5: the batch mean of the IUR part is the mean over the selected samples only
    assert iur.mean() == pytest.approx(kl[correct].mean())


def test_cks_mask_and_unseen_samples():
    logits0, features0 = epoch_zero_records()
    loss = build()
    record_epoch(loss, logits0, features0, order=(range(0, 4), range(4, 7)))  # sample 7 never drawn
    assert loss.pred_correct.tolist() == [True, False, True, True, True, False, True, False]
    loss.on_epoch_start(1, 2)
    idx, logits, batch = second_epoch_batch()
    output = ModelOutput(logits=logits, features=torch.zeros(len(idx), D))
    without_iur = (1 - loss.alpha) * F.cross_entropy(logits, batch.targets, reduction="none") + loss.alpha * (
        -(loss.soft_labels[batch.targets] * F.log_softmax(logits / loss.tau, 1)).sum(1))  # ICL softened
    residual = loss(output, batch.targets, batch).total - without_iur
    # samples 5 (wrong), 7 (unseen) and 1 (wrong) get no IUR; 2 and 0 (right last epoch) do
    assert (residual.abs() > 1e-6).tolist() == [False, True, False, False, True]


def test_topk_with_all_classes_equals_dense_storage_exactly():
    logits0, features0 = epoch_zero_records()
    dense, full_topk = build(topk=None), build(topk=C)
    for loss in (dense, full_topk):
        record_epoch(loss, logits0, features0)
        loss.on_epoch_start(1, 2)
    idx, logits, batch = second_epoch_batch()
    output = ModelOutput(logits=logits, features=torch.zeros(len(idx), D))
    assert torch.equal(dense(output, batch.targets, batch).total, full_topk(output, batch.targets, batch).total)
    assert torch.equal(dense.previous_probs(idx), full_topk.previous_probs(idx))


def test_topk_keeps_the_largest_and_spreads_the_rest_evenly():
    logits0, features0 = epoch_zero_records()
    loss = build(topk=2, tau=TAU)
    record_epoch(loss, logits0, features0)
    probs = np.exp(np_log_softmax(logits0.numpy() / TAU))
    stored = loss.previous_probs(torch.arange(N)).numpy()
    for row, p in zip(stored, probs):
        top = np.argsort(-p)[:2]
        rest = [c for c in range(C) if c not in top]
        np.testing.assert_allclose(row[top], p[top], rtol=1e-3)  # fp16
        np.testing.assert_allclose(row[rest], (1 - row[top].sum()) / 2, rtol=1e-6)
        assert row.sum() == pytest.approx(1.0, abs=1e-6)


def test_state_survives_a_state_dict_round_trip():
    logits0, features0 = epoch_zero_records()
    loss = build(topk=2, base="ldam_drw", base_params={"drw_epoch": 1})
    record_epoch(loss, logits0, features0)
    state = loss.state_dict()
    assert {"pred_values", "pred_indices", "pred_correct", "pred_fresh", "soft_labels", "has_previous"} <= set(state)
    assert not {"seen", "epoch_keys", "sample_keys", "sample_features", "sample_targets", "projection"} & set(state)
    restored = build(topk=2, base="ldam_drw", base_params={"drw_epoch": 1})
    restored.load_state_dict(state)
    idx, logits, batch = second_epoch_batch()
    output = ModelOutput(logits=logits, features=torch.zeros(len(idx), D))
    for module in (loss, restored):
        module.on_epoch_start(1, 4)
    assert restored.alpha == loss.alpha == pytest.approx(1 / 16)
    assert restored.base.weight.tolist() != [1.0] * C  # the base's own hook ran (DRW from epoch 1)
    torch.testing.assert_close(restored(output, batch.targets, batch).total, loss(output, batch.targets, batch).total)


def test_configuration_errors():
    with pytest.raises(ValueError, match="num_samples"):
        LOSSES.build("ikl", {}, class_counts=COUNTS, num_classes=C)
    with pytest.raises(ValueError, match="allowed: equal, linear, cosine, parabolic"):
        build(alpha_schedule="square")
    with pytest.raises(ValueError, match="cannot wrap itself"):
        build(base="ikl")
    logits0, features0 = epoch_zero_records()
    loss = build()
    record_epoch(loss, logits0, features0)
    loss.on_epoch_start(1, 2)
    idx, logits, batch = second_epoch_batch()
    output = ModelOutput(logits=logits, features=torch.zeros(len(idx), D))
    with pytest.raises(ValueError, match="needs the batch"):
        loss(output, batch.targets)
    short = Batch(images=batch.images, targets=batch.targets, indices=batch.indices[:2])
    with pytest.raises(ValueError, match="one batch index per prediction"):
        loss(output, batch.targets, short)


def _merge_worker(rank, world_size, init_file, results, params):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits0, features0 = epoch_zero_records()
        loss = build(**params)
        mine = [list(range(N))[rank::world_size]]  # each rank sees only its shard of the epoch
        record_epoch(loss, logits0, features0, order=mine)
        results[rank] = {k: v.clone() for k, v in loss.state_dict().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("params", [
    dict(topk=2, median_cap=None),  # exact medians: every sample's features travel
    dict(topk=2, median_cap=2, label_topk=2),  # class 0 (4 samples) is sampled: the merged sample is a single run's
])
def test_ranks_merge_their_records_at_epoch_end(tmp_path, params):
    logits0, features0 = epoch_zero_records()
    single = build(**params)
    record_epoch(single, logits0, features0)
    results = mp.Manager().dict()
    mp.spawn(_merge_worker, args=(2, str(tmp_path / "init"), results, params), nprocs=2, join=True)
    for rank in range(2):
        for key, value in single.state_dict().items():
            assert torch.equal(results[rank][key], value), (rank, key)


def test_a_sample_not_drawn_last_epoch_gets_no_iur_from_an_older_prediction():
    logits0, features0 = epoch_zero_records()
    loss = build()
    record_epoch(loss, logits0, features0, epoch=0, total=3)
    record_epoch(loss, logits0, features0, epoch=1, total=3, order=([0, 1, 3, 4, 5, 6, 7],))  # no sample 2
    loss.on_epoch_start(2, 3)
    idx, logits, batch = second_epoch_batch()  # samples 5, 2, 7, 1, 0; 2 was right in epoch 0
    output = ModelOutput(logits=logits, features=torch.zeros(len(idx), D))
    residual = loss(output, batch.targets, batch).total - (1 - loss.alpha) * F.cross_entropy(
        logits, batch.targets, reduction="none") - loss.alpha * (
        -(loss.soft_labels[batch.targets] * F.log_softmax(logits / loss.tau, 1)).sum(1))
    assert (residual.abs() > 1e-6).tolist() == [False, False, True, False, True]


def _icl_of_one_sample(base, base_params, reading, logits, softened=False):
    loss = build(base=base, base_params=base_params, icl_logits=reading, alpha_schedule="equal",
                 icl_softened=softened)
    logits0, features0 = epoch_zero_records()
    record_epoch(loss, logits0, features0)
    loss.soft_labels.copy_(0.5 * torch.eye(C) + 0.125)  # the target keeps 5/8, every other class 1/8
    loss.on_epoch_start(1, 2)  # alpha 1/2
    idx = torch.tensor([0])  # class 0 (4 training images)
    batch = Batch(images=torch.zeros(1, 1, 1, 1), targets=LABELS[idx], indices=idx)
    result = loss(ModelOutput(logits=torch.tensor([logits]), features=torch.zeros(1, D)), batch.targets, batch)
    return float(result.terms["icl"][0]) / loss.alpha


def _soft_ce(z, q):
    import math
    log_norm = math.log(sum(math.exp(v) for v in z))
    return -sum(qj * (zj - log_norm) for qj, zj in zip(q, z))


@pytest.mark.parametrize("base, base_params, adjusted", [
    # balanced softmax: + log n_y, n = (4, 2, 1, 1)
    ("balanced_softmax", None, lambda z: [z[0] + np.log(4), z[1] + np.log(2), z[2], z[3]]),
    # logit adjustment, tau 2: + 2 log(n_y / 8)
    ("logit_adjustment", {"tau": 2.0}, lambda z: [v + 2 * np.log(n / 8) for v, n in zip(z, COUNTS)]),
    # LDAM, scale 2: margin 0.5 * (4 ** -0.25) / 1 at the target (class 0), then x 2
    ("ldam_drw", {"max_margin": 0.5, "scale": 2.0},
     lambda z: [2 * (z[0] - 0.5 * 4 ** -0.25), 2 * z[1], 2 * z[2], 2 * z[3]]),
    ("ce", None, lambda z: z),  # nothing to adjust
])
def test_icl_on_raw_or_on_the_base_loss_adjusted_logits(base, base_params, adjusted):
    z = [1.0, 0.0, -1.0, 0.5]
    q = [5 / 8, 1 / 8, 1 / 8, 1 / 8]
    assert _icl_of_one_sample(base, base_params, "raw", z) == pytest.approx(_soft_ce(z, q), rel=1e-5)
    assert _icl_of_one_sample(base, base_params, "adjusted", z) == pytest.approx(_soft_ce(adjusted(z), q), rel=1e-5)
    with pytest.raises(ValueError, match="allowed: raw, adjusted"):
        build(icl_logits="prior")


def test_softened_icl_is_the_cross_entropy_of_the_tau_softened_prediction():
    """icl_softened reads eq. 8's p as eq. 1's softmax(z / tau): the same soft CE on z / tau (tau 2 here),
    on the raw or the adjusted logits."""
    z = [1.0, 0.0, -1.0, 0.5]
    q = [5 / 8, 1 / 8, 1 / 8, 1 / 8]
    assert _icl_of_one_sample("ce", None, "raw", z, softened=True) == pytest.approx(
        _soft_ce([v / 2 for v in z], q), rel=1e-5)
    adjusted = [z[0] + np.log(4), z[1] + np.log(2), z[2], z[3]]  # balanced softmax, n = (4, 2, 1, 1)
    assert _icl_of_one_sample("balanced_softmax", None, "adjusted", z, softened=True) == pytest.approx(
        _soft_ce([v / 2 for v in adjusted], q), rel=1e-5)
