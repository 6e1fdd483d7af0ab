"""distopt: sharded ML-FOP-SOAP (SOAP + Fisher-Orthogonal Projection with hierarchical micro-step folding)."""

from distopt.rules import TwoObjective, combine
from distopt.mlfop import MLFOPSOAP, attention_head_splits
from distopt.registry import OPTIMIZERS, build_optimizer, valid_arguments
from distopt.soap import SOAP

__all__ = ["SOAP", "MLFOPSOAP", "TwoObjective", "attention_head_splits", "build_optimizer", "valid_arguments",
           "OPTIMIZERS", "combine"]
