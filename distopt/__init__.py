"""distopt: sharded ML-FOP-SOAP (SOAP + Fisher-Orthogonal Projection with hierarchical micro-step folding)."""

# torch.optim imports torch._dynamo when the first optimizer is built. If that first import happens
# after init_process_group, torch 2.13 keeps the default gloo group referenced from C++, its threads
# outlive destroy_process_group, and the interpreter's teardown aborts on some runs ("terminate
# called without an active exception"). Importing it here, before any process group exists, avoids that.
import torch._dynamo  # noqa: F401  (isort: skip)

from distopt.rules import TwoObjective, combine
from distopt.mlfop import MLFOPSOAP, attention_head_splits
from distopt.registry import OPTIMIZERS, build_optimizer, valid_arguments
from distopt.soap import SOAP

__all__ = ["SOAP", "MLFOPSOAP", "TwoObjective", "attention_head_splits", "build_optimizer", "valid_arguments",
           "OPTIMIZERS", "combine"]
