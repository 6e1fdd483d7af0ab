"""distopt: sharded ML-FOP-SOAP (SOAP + Fisher-Orthogonal Projection with hierarchical micro-step folding).

The life of one gradient (docs/architecture.md draws it):

    loss.backward()                          autograd, one micro-step
      -> capture.MicrostepCapture             a post-accumulate-grad hook per parameter, as each p.grad is done
      -> mlfop.MLFOPSOAP.grad_ready           window.Schedule: keep it in p.grad, stash it, or send it:
      -> distributor.add                      into owner-aligned buckets, reduce-scattered as they fill
                                              (distopt.fsdp2: FSDP2's shard, all-to-all to the owners)
      -> mlfop.MLFOPSOAP.microstep_ends       at the end of the next backward, what arrived is ...
      -> window.Window.receive                ... added to G and folded:
      -> fold.StreamingFold / TreeFold        hierarchical FOP folds of the micro-steps
      -> levels.Levels.combine                s, beta* per layer / head / model (fop.py's formulas)
    optimizer.step()
      -> mlfop.MLFOPSOAP._update              agree across ranks, flush the schedule's tail, last folds
      -> mlfop._boundary_sums                 one fp64 all-reduce: non-finite flag, |G|^2, presence, diagnostics
      -> soap.soap_update                     SOAP on each owned block (state and fp32 master: owner only)
      -> distributor.write_back               updated blocks to every rank (all-gather, or all-to-all to shards)

Pure math (soap, fop, fold, plan) never communicates; communication lives in comm, distributor and
fsdp2; options are typed in options; the registry builds any optimizer from a config's {name, params}.
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
