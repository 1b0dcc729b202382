"""The decoupled classifier stage (docs/ARCHITECTURE.md): cRT, LWS, tau-norm,
NCM, MiSLAS and LADC on a frozen stage-1 backbone, trained by the engine's Trainer. Importing the
package registers the methods (``longtail.registry.STAGE2``), its head kinds (``HEADS``) and LADC's
sampler (``SAMPLERS["ladc"]``); ``run_stage2`` runs one."""
from longtail.stage2 import methods, samplers  # noqa: F401  (registration)
from longtail.stage2.heads import LWSPlusHead, NCMHead
from longtail.stage2.runner import Stage2Result, run_stage2

__all__ = ["LWSPlusHead", "NCMHead", "Stage2Result", "run_stage2"]
