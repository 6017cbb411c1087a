"""Mixed-precision fine-tuning with exact resume: `fit(model, dataset, TrainConfig(...))`."""

from flashtune.training.loss import causal_lm_loss_sum, linear_cross_entropy
from flashtune.training.precision import PrecisionPolicy
from flashtune.training.trainer import NonFiniteTraining, TrainConfig, TrainingInterrupted, TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "NonFiniteTraining", "fit", "PrecisionPolicy",
           "linear_cross_entropy", "causal_lm_loss_sum"]
