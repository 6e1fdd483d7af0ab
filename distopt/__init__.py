"""distopt: sharded ML-FOP-SOAP (SOAP + Fisher-Orthogonal Projection with hierarchical micro-step folding).

The life of one gradient (docs/architecture.md draws it):

    loss.backward()                      autograd, one micro-step
      -> capture.MicrostepCapture         post-accumulate-grad hooks, one end-of-backward callback
      -> window.Window.add                the micro-step's gradient of every block ...
      -> distributor.reduce               ... summed over ranks onto each block's owner (async)
      -> window.Window.drain              at the next micro-step: added to G and folded
      -> fold.StreamingFold / TreeFold    hierarchical FOP folds of the micro-steps
      -> levels.Levels.combine            s, beta* per layer / head / model (fop.py's formulas)
    optimizer.step()
      -> mlfop.MLFOPSOAP._step_window     last fold, one fp64 all-reduce (flags, norm, eta*)
      -> soap.soap_update                 SOAP on each owned block (state: owner only)
      -> distributor.write_back           updated blocks to every rank

Pure math (soap, fop, fold, plan) never communicates; communication lives in comm and distributor;
options are typed in options; the registry builds any optimizer from a config's {name, params}.
"""

# torch.optim imports torch._dynamo when the first optimizer is built. If that first import happens
# after init_process_group, torch 2.13 keeps the default gloo group referenced from C++, its threads
# outlive destroy_process_group, and the interpreter's teardown aborts on some runs ("terminate
# called without an active exception"). Importing it here, before any process group exists, avoids that.
import torch._dynamo  # noqa: F401  (isort: skip)

from distopt.mlfop import MLFOPSOAP, attention_head_splits
from distopt.options import MLFOPOptions, OptionError, RuleOptions, SOAPOptions
from distopt.registry import OPTIMIZERS, build_optimizer, parse_options, valid_arguments
from distopt.rules import TwoObjective
from distopt.soap import SOAP

__all__ = ["SOAP", "MLFOPSOAP", "TwoObjective", "attention_head_splits", "build_optimizer", "parse_options",
           "valid_arguments", "OPTIMIZERS", "SOAPOptions", "MLFOPOptions", "RuleOptions", "OptionError"]
