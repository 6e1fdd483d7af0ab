"""distopt: sharded ML-FOP-SOAP (SOAP + Fisher-Orthogonal Projection with hierarchical micro-step folding).

The life of one gradient (docs/architecture.md draws it):

    loss.backward()                          autograd, one micro-step
      -> capture.MicrostepCapture             a post-accumulate-grad hook per parameter, as each p.grad is done
      -> accumulate.Accumulator.add           accumulate.Schedule: keep it in p.grad, stash it, or send it:
      -> distributors.Distributor.add         owner-aligned buckets reduce-scattered as they fill (owner), or
                                              FSDP2's reduced shard, all-to-all to the owners (fsdp2)
      -> mlfop.MLFOPSOAP.microstep_ends       at the end of the next backward, what arrived is ...
      -> window.Window.receive                ... added to G and folded:
      -> fold.StreamingFold / TreeFold        hierarchical FOP folds of the micro-steps
      -> levels.Levels.combine                s, beta* per layer / head / model (fop.py's formulas)
    optimizer.step()
      -> mlfop.MLFOPSOAP._update              agree across ranks (comm.Checks), flush the schedule's tail
      -> window.Window.folded                 the last folds
      -> boundary.Boundary.reduce             one fp64 all-reduce: non-finite flag, |G|^2, presence, diagnostics
      -> distributors.Distributor.targets     per owned block: the parameter's view, or its fp32 master
      -> soap.soap_update                     SOAP on each owned block (state and fp32 master: owner only)
      -> distributors.Distributor.write_back  updated blocks to every rank (all-gather, or all-to-all to shards)

Pure math (soap, fop, fold, plan) never communicates; communication lives in comm and distributors/;
options are typed in options; interfaces are declared in protocols; the registry builds any
optimizer from a config's {name, params}.
"""

# torch.optim imports torch._dynamo when the first optimizer is built. If that first import happens
# after init_process_group, torch 2.13 keeps the default gloo group referenced from C++, its threads
# outlive destroy_process_group, and the interpreter's teardown aborts on some runs ("terminate
# called without an active exception"). Importing it here, before any process group exists, avoids that.
import torch._dynamo  # noqa: F401  (isort: skip)

from distopt.levels import attention_head_splits
from distopt.mlfop import MLFOPSOAP
from distopt.options import MLFOPOptions, OptionError, RuleOptions, SOAPOptions
from distopt.registry import OPTIMIZERS, build_optimizer, parse_options, valid_arguments
from distopt.rules import TwoObjective
from distopt.soap_optimizer import SOAP

__all__ = ["SOAP", "MLFOPSOAP", "TwoObjective", "attention_head_splits", "build_optimizer", "parse_options",
           "valid_arguments", "OPTIMIZERS", "SOAPOptions", "MLFOPOptions", "RuleOptions", "OptionError"]
