"""Deep metric learning detector (AnomalyTwin): heads in heads.py, procedure in detector.py."""

from anomalab.detectors.metric.detector import MODES, Metric, make_twins
from anomalab.detectors.metric.heads import HEADS, center_loss, make_head

__all__ = ["HEADS", "MODES", "Metric", "center_loss", "make_head", "make_twins"]
