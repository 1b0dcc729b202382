"""How far SHIKE's DKT in the authors' code form departs from the paper's eq. 8 (docs/FIDELITY.md).

Random 3-expert logits in the units of a cosine head x30: the target logit 20, the non-target ones
drawn around a mean; prints both losses, and the cosine and norm ratio of their gradients.
    python benchmarks/shike_dkt_forms.py
"""
import torch
import torch.nn.functional as F

from longtail.functional import shike_dkt_loss


def compare(num_classes: int, mean: float, sd: float, batch: int = 256, experts: int = 3) -> str:
    generator = torch.Generator().manual_seed(0)
    logits = (mean + sd * torch.randn(experts, batch, num_classes, generator=generator, dtype=torch.float64))
    logits = logits.clamp(-30, 30)
    targets = torch.randint(0, num_classes, (batch,), generator=generator)
    logits[:, torch.arange(batch), targets] = 20.0
    results = {}
    for form in ("code", "paper"):
        x = logits.clone().requires_grad_(True)
        loss = shike_dkt_loss(x, targets, form=form)
        loss.backward()
        results[form] = (loss.item(), x.grad.flatten())
    cosine = F.cosine_similarity(results["code"][1], results["paper"][1], dim=0).item()
    ratio = (results["code"][1].norm() / results["paper"][1].norm()).item()
    return (f"| {num_classes} | {mean:+.0f} ± {sd:g} | {results['code'][0]:.3f} | {results['paper'][0]:.3f} | "
            f"{cosine:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    print("| C | non-target logits | L_nt code | L_nt paper | gradient cosine | gradient norm code/paper |")
    print("|---:|---|---:|---:|---:|---:|")
    for num_classes in (10, 100):
        for mean, sd in ((0.0, 3.0), (-3.0, 3.0), (-6.0, 1.5)):
            print(compare(num_classes, mean, sd))
