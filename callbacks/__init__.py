"""Lightning callbacks that schedule calmwild's evaluations during training and log their results.

Configure them under ``trainer.callbacks`` with class paths ``callbacks.PerSigmaMSE``,
``callbacks.PerSigmaMemorization``, ``callbacks.TrajectoryMemorization``, ``callbacks.EarlyDetection``,
``callbacks.FID`` and ``callbacks.SampleGrid``; ``callbacks.DangerZone`` computes the training set's danger zone when
a fit starts; ``callbacks.SampleWriter`` writes the samples of ``calmwild predict``.
"""

from callbacks.base import EvaluationCallback
from callbacks.early import EarlyDetection
from callbacks.geometry import DangerZone
from callbacks.per_sigma import PerSigmaMemorization, PerSigmaMSE
from callbacks.predict import SampleWriter
from callbacks.samples import FID, SampleGrid, TrajectoryMemorization

__all__ = ["DangerZone", "EarlyDetection", "EvaluationCallback", "FID", "PerSigmaMSE", "PerSigmaMemorization",
           "SampleGrid", "SampleWriter", "TrajectoryMemorization"]
