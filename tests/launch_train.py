"""A short sharded training run of the test model under a real launcher (deepspeed, torchrun, mpiexec).

Every rank trains on its slice of the same global micro-batches as the single-process reference
(sharded_worker.train with global_batch=True), so the final parameters can be compared. With
`--engine deepspeed` the run goes through distopt.deepspeed_glue and counts the engine's own
gradient all-reduce calls, which must stay at zero.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sharded_worker import build, loss_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", choices=["deepspeed", "plain"], default="deepspeed")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--die-at", type=int, nargs=2, metavar=("STEP", "RANK"))
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args()

    import deepspeed
    import torch.distributed as dist

    from distopt import comm, deepspeed_glue

    deepspeed_glue.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, opt = build({"K": args.K, "max_block": 4}, torch.float64, world)
    allreduce_calls = [0]
    if args.engine == "deepspeed":
        from distopt import deepspeed_glue

        opt.close()  # the glue builds its own optimizer over the same model
        spec = {"name": "mlfop_soap", "params": dict(lr=0.02, betas=[0.9, 0.95], weight_decay=0.01,
                                                      precondition_frequency=2, max_block=4, verbose=False)}
        engine, opt = deepspeed_glue.initialize(model, spec, {
            "train_micro_batch_size_per_gpu": 12 // world, "gradient_accumulation_steps": args.K,
            "gradient_clipping": 0.0, "steps_per_print": 10**9})
        original = engine.allreduce_gradients

        def counted(*a, **kw):
            allreduce_calls[0] += 1
            return original(*a, **kw)

        engine.allreduce_gradients = counted
    for step in range(args.steps):
        for k in range(args.K):
            loss = loss_of(model, step, rank, k, torch.float64, world=world)
            if args.engine == "deepspeed":
                engine.backward(loss)
                engine.step()
            else:
                (loss / args.K).backward()
        if args.die_at and (step, rank) == tuple(args.die_at):
            os._exit(17)
        if args.engine == "plain":
            opt.step()
            opt.zero_grad()
    # DeepSpeed's shared-memory all-reduce (up only where the launcher set LOCAL_SIZE; elsewhere its
    # kernel would touch unmapped memory) still works after init_distributed unlinked its files
    shm = deepspeed_glue.shared_memory_all_reduce()
    summed = torch.full((1024,), float(rank + 1))
    if shm:
        deepspeed.comm.inference_all_reduce(summed)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save([p.detach().clone() for p in model.parameters()], os.path.join(args.out, "params.pt"))
        with open(os.path.join(args.out, "stats.json"), "w") as f:
            json.dump(dict(world=world, allreduce_calls=allreduce_calls[0], counters=dict(opt.counters),
                           sent=opt.comm_bytes(), shm_op=shm, summed=summed.unique().tolist(),
                           shm_files=[deepspeed_glue.shared_memory_buffer(r) for r in range(world)]), f)
    comm.destroy_process_group()  # gloo's threads must stop before the interpreter exits


if __name__ == "__main__":
    main()
