"""Models (registered in ``longtail.registry.MODELS``): CIFAR ResNets, torchvision ResNets, multi-expert
SHIKE/RIDE, BBN, tiny models for Digits-LT and pretrained timm/open_clip networks (``foundation``). Every model's ``forward(x)`` returns a
``longtail.types.ModelOutput`` and has ``.heads``, ``logits_from_features`` and ``backbone_parameters``
(docs/ARCHITECTURE.md, "Models"). Importing this package registers them all."""
from longtail.models import bbn, cifar_resnet, experts, foundation, small, torchvision_backbones  # noqa: F401  (registration)
from longtail.models.bbn import BBN
from longtail.models.classifier import Classifier, StagedBackbone, Trunk, load_pretrained
from longtail.models.experts import DepthwiseKnowledgeFusion
from longtail.models.heads import CosineHead, LinearHead, LWSHead, TauNormHead, make_head

__all__ = ["BBN", "Classifier", "StagedBackbone", "Trunk", "load_pretrained",
           "DepthwiseKnowledgeFusion", "CosineHead", "LinearHead", "LWSHead", "TauNormHead", "make_head"]
