"""The decoupled classifier stage (docs/ARCHITECTURE.md; DESIGN.md "stage2/"): cRT, LWS, tau-norm,
NCM, MiSLAS and LADC on a frozen stage-1 backbone. Importing the package registers the methods
(``longtail.registry.STAGE2``) and LADC's sampler (``SAMPLERS["ladc"]``); ``run_stage2`` runs one."""
from longtail.stage2 import methods, samplers  # noqa: F401  (registration)
from longtail.stage2.heads import LWSPlusHead, NCMHead, restore_heads
from longtail.stage2.runner import run_stage2

__all__ = ["LWSPlusHead", "NCMHead", "restore_heads", "run_stage2"]
