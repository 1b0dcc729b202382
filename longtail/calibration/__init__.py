"""Calibration: metrics (ECE, MCE, adaptive and class-wise ECE, NLL, Brier, per shot group), post-hoc
calibrators registered in ``longtail.registry.CALIBRATORS`` (ts, vs, ets, hist, iso, ts_ir, ir_pooled,
sbc, gpc, kt_ts) and reliability diagrams (``longtail.calibration.diagrams``, imported on use: it loads matplotlib)."""
from longtail.calibration.calibrators import (Calibrator, EnsembleTemperatureScaling, GPCalibration, HistogramBinning,
                                              IsotonicOneVsAll, IsotonicPooled, ScalingBinning,
                                              TemperatureIsotonic, TemperatureScaling, VectorScaling,
                                              load_calibrator)
from longtail.calibration.knowledge_transfer import KnowledgeTransferTS, head_mask_from_counts
from longtail.metrics import calibration_report

__all__ = ["Calibrator", "TemperatureScaling", "VectorScaling", "EnsembleTemperatureScaling", "HistogramBinning",
           "IsotonicOneVsAll", "TemperatureIsotonic", "IsotonicPooled", "ScalingBinning", "GPCalibration",
           "KnowledgeTransferTS",
           "head_mask_from_counts", "load_calibrator", "calibration_report"]
