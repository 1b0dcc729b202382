"""Long-tailed datasets, samplers and loaders (docs/ARCHITECTURE.md, "Data").

Importing the package registers the datasets (``DATASETS``) and samplers (``SAMPLERS``). The batched
augmentation (``longtail.data.augment``) and the loaders are imported where they are used.
"""
from longtail.data.datasets import DataBundle, ImageSet, build_data
from longtail.data.samplers import Sampler
from longtail.data.sources import DataError

__all__ = ["DataBundle", "DataError", "ImageSet", "Sampler", "build_data"]
