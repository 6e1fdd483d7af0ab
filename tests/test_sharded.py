"""Sharded ML-FOP-SOAP (gloo ranks, spawned) equals the single-process reference on the same global batch,
communicates what the formula says, and fails the same way on every rank."""

import math
from typing import Any

import pytest
import torch

from sharded_worker import run_failing, run_sharded, train

# (world, configs): each config is one training run; all configs of a world size share one spawn.
CASES: dict[int, list[dict[str, Any]]] = {
    1: [dict(K=3), dict(K=2, max_block=4)],
    2: [dict(K=1), dict(K=4, max_block=4), dict(K=3, pair_source="ranks"), dict(K=2, dtype="fp32"),
        dict(K=2, shuffle=True, max_block=4), dict(K=2, fop=False), dict(K=4, schedule="tree", bucket_mb=1e-4),
        dict(K=3, dtype="bf16")],
    3: [dict(K=5, max_block=4, bucket_mb=2e-4), dict(K=2, pair_source="ranks"), dict(K=3, max_grad_norm=0.05),
        dict(K=2, hidden=16)],
    4: [dict(K=2, max_block=4), dict(K=1, pair_source="ranks"), dict(K=3), dict(K=4, dtype="bf16", max_block=4)],
}

# float64: sums over ranks and micro-steps run in another order than in the reference; eigh and QR
# amplify that round-off by 1 / (eigenvalue gap), which leaves ~1e-10 after 5 steps.
# float32: the same reordering perturbs sums by ~1e-7 relative. Adam's first steps are close to
# sign(g') per rotated coordinate, so a coordinate at round-off level can flip and move its entries
# by O(lr): elementwise bounds are meaningless there. We bound each parameter's relative Frobenius
# difference by 1e-3 (measured: <= 3.1e-4 over 5 steps), far below what a real defect produces.
# bfloat16 parameters: the reference runs the optimizer on fp32 shadows of the bf16 parameters (its
# masters), sums the ranks' bf16 gradients in fp32 and rounds the shadows into the model after each
# step, so it differs from the ranks only by the fp32 reduction order. After the first update we bound
# each master's displacement (a stricter measure than the parameter itself: the first update is
# close to lr * sign per rotated coordinate) by 1e-2 relative (measured <= 1.2e-3); later,
# a bf16 parameter may round the other way where its master sits on a rounding boundary, and the
# forward passes differ from then on, and the difference grows like any chaotic perturbation: the
# parameters get a bound of a few bf16 ulps (2^-8 = 0.4% each), 5e-2 relative (measured <= 1.8e-2).
FP64_TOL: dict[str, Any] = dict(rtol=1e-8, atol=5e-10)
FP32_RELATIVE = 1e-3
BF16_RELATIVE = 5e-2
MASTER_DISPLACEMENT = 1e-2


def assert_matches(got, ref, dtype, what):
    if dtype == "fp64":
        torch.testing.assert_close(got, ref, **FP64_TOL, msg=lambda m: f"{what}: {m}")
    else:
        rel = float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))
        assert rel <= (FP32_RELATIVE if dtype == "fp32" else BF16_RELATIVE), f"{what}: relative difference {rel:.2e}"


def reference(config, world):
    return train({**config, "W": world, "reference": True}, 0, 1)


@pytest.mark.parametrize("world", sorted(CASES))
def test_sharded_equals_single_process(world, tmp_path):
    configs = [{**c, "W": world} for c in CASES[world]]
    results = run_sharded(world, configs, str(tmp_path))
    for ci, config in enumerate(configs):
        ref = reference(config, world)
        dtype = config.get("dtype", "fp64")
        for step, ref_params in enumerate(ref["history"]):
            for r in range(world):
                got = results[r][ci]["history"][step]
                for a, b in zip(got, results[0][ci]["history"][step], strict=True):
                    assert torch.equal(a, b), f"{config}: ranks disagree after step {step}"
                for a, b in zip(got, ref_params, strict=True):
                    assert_matches(a, b, dtype, f"{config} step {step}")
        for key in ("eigh", "qr", "fop_folds"):
            total = sum(results[r][ci]["counters"].get(key, 0) for r in range(world))
            assert total == ref["counters"].get(key, 0), f"{config}: {key} summed over ranks {total} != reference"
        if config.get("fop", True) and config.get("K", 1) > 1 or config.get("pair_source") == "ranks":
            assert ref["counters"]["fop_folds"] > 0, f"{config}: the reference never folded"
        if dtype == "bf16":
            assert_masters_match(results, ci, ref, config)


def assert_masters_match(results, ci, ref, config):
    """bf16 parameters: each block's fp32 master lives on exactly one rank, and after the first update
    (whose forwards used the same bf16 parameters everywhere) it equals the one-process run's fp32
    master to fp32 round-off. Later steps feed bf16 roundings of the masters back into the forward,
    where a master on a rounding boundary may round the other way; those are bounded by the bf16
    parameter comparison above."""
    for what in ("first_masters", "masters"):
        masters = {}
        for r in range(len(results)):
            for key, value in results[r][ci][what].items():
                assert key not in masters, f"{config}: master {key} on two ranks"
                masters[key] = value
        assert set(masters) == set(ref[what]) and masters, f"{config}: masters {sorted(masters)}"
    for master in masters.values():
        assert master.dtype == torch.float32
    for r in range(len(results)):
        for key, master in results[r][ci]["first_masters"].items():
            moved = master - ref["initial_masters"][key]
            ref_moved = ref["first_masters"][key] - ref["initial_masters"][key]
            if float(ref_moved.norm()) == 0:  # a parameter no backward reached by then (extra: even steps)
                assert float(moved.norm()) == 0, f"{config}: master {key} moved without a gradient"
                continue
            rel = float((moved - ref_moved).norm() / ref_moved.norm())
            assert rel <= MASTER_DISPLACEMENT, f"{config}: master {key} moved by a relative {rel:.2e} more"


def test_a_rank_that_owns_nothing(tmp_path):
    """Four ranks, three parameters: one rank owns no block and still takes part in every collective."""
    configs = [dict(K=2, W=4, only=["l1.weight", "l2.weight", "head.weight"])]
    results = run_sharded(4, configs, str(tmp_path))
    assert sorted(results[r][0]["owned"] for r in range(4)) == [0, 1, 1, 1]
    ref = reference(configs[0], 4)
    for r in range(4):
        for a, b in zip(results[r][0]["history"][-1], ref["history"][-1], strict=True):
            assert_matches(a, b, "fp64", "rank that owns nothing")


def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path):
    configs = [dict(K=2, W=2, nan_at=(2, 1))]
    results = run_sharded(2, configs, str(tmp_path))
    for r in range(2):
        res = results[r][0]
        assert res["counters"]["skipped_nonfinite_steps"] == 1
        for a, b in zip(res["history"][2], res["history"][1], strict=True):
            assert torch.equal(a, b), "the step with a NaN gradient must change nothing"
        assert all(torch.isfinite(p).all() for p in res["history"][-1])


def reductions(k, config):
    """The formula (docs/distributed.md): reductions per step by schedule."""
    if not config.get("fop", True):
        return 1
    if config.get("pair_source") == "ranks":
        return 2
    if config.get("schedule") == "tree":
        return k
    return math.ceil(math.log2(k)) + 1


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_by_kind_follow_the_formula(world, tmp_path):
    """Per rank and step: ceil(log2 K) + 1 reduce-scatters of the [world, W] slot layout for the
    streaming fold (K for tree, 1 with FOP off, 2 for rank pairs), one all-gather of this rank's slot,
    and small fp64 all-reduces (a check per reduction, the step's agreement and boundary sums). The
    byte counts are the collectives' input sizes; a test of the counting, not of gloo."""
    steps = 4
    configs = [dict(K=k, W=world, max_block=4, steps=steps, bucket_mb=1e-4, **extra)
               for k, extra in ((8, {}), (6, {}), (1, {}), (4, dict(schedule="tree")), (3, dict(fop=False)),
                                (3, dict(pair_source="ranks")))]
    results = run_sharded(world, configs, str(tmp_path))
    for config, res in zip(configs, results[0], strict=True):
        per_step = reductions(config["K"], config)
        width = res["slot"] * 8  # fp64 parameters reduce and gather in fp64
        # the slot cut into buckets of bucket_mb (per rank's row: bucket_mb / world of 8-byte elements)
        buckets = math.ceil(res["slot"] / max(1, int(config["bucket_mb"] * 2**20) // (8 * world)))
        assert buckets > 1, "small buckets: the test must cover several buckets per reduction"
        assert res["counters"]["reductions"] == steps * per_step, config
        assert res["calls"]["reduce_scatter"] == steps * per_step * buckets, config
        assert res["sent"]["reduce_scatter"] == steps * per_step * world * width, config
        assert res["calls"]["all_gather"] == steps * buckets and res["sent"]["all_gather"] == steps * width, config
        # all-reduces: one check per reduction, the agreement and the boundary sums, plus fold partials
        # for parameters cut over several owners (max_block=4 cuts every matrix here)
        small = res["calls"]["all_reduce"] - steps * (per_step + 2)
        folds_per_step = res["counters"]["fop_folds"] > 0
        assert small >= 0 and (small == 0) == (not folds_per_step), (config, res["calls"])


def test_memory_follows_the_formula(tmp_path):
    """Bytes the optimizer holds per rank (sums of tensor sizes) against docs/distributed.md's formula,
    for K = 1, 4, 8 (fp64: 8 bytes per element; one bucket per reduction):
        state  = 8 * sum over owned blocks of (2 n + 2 d^2 per rotated side)
        window = 8 * 3 S           G, the streaming fold's running z and the chunk arriving to fold into it
                                   (8 * 2 S for K = 1: G and z, nothing arrives to fold)
        comm   = 8 * (2 W + world W) during micro-steps (two shares in flight, one [world, W] bucket);
                 8 * (W + world W) for K = 1."""
    configs = [dict(K=k, W=2, max_block=4, steps=4) for k in (1, 4, 8)]
    results = run_sharded(2, configs, str(tmp_path))
    for r in range(2):
        for config, res in zip(configs, results[r], strict=True):
            slot, owned, world = res["slot"], res["owned_numel"], 2
            expected = {"state": 8 * res["state_numel"], "window_peak": 8 * (3 if config["K"] > 1 else 2) * owned,
                        "comm_peak": 8 * ((2 if config["K"] > 1 else 1) * slot + world * slot)}
            for kind, value in expected.items():
                got = res["memory"][kind]
                assert abs(got - value) <= 0.1 * value, f"rank {r} K={config['K']}: {kind} {got} vs formula {value}"


def test_a_failing_collective_stops_every_rank_with_its_name(tmp_path):
    """Rank 1's third reduce-scatter raises: it stops with an error naming itself and the call, and
    rank 0 stops too (an error naming its own failed call), well inside the process-group timeout."""
    codes, errors, seconds = run_failing(2, [dict(K=4, W=2, fail_at=3)], str(tmp_path), timeout=100)
    assert all(code not in (0, None) for code in codes), (codes, errors)
    assert "rank 1: reduce_scatter #3 failed (RuntimeError: injected failure)" in errors[1], errors[1]
    assert "rank 0:" in errors[0] and "failed" in errors[0], errors[0]
    assert seconds < 90, f"ranks took {seconds:.0f} s to stop"


def test_ranks_with_different_micro_step_counts_refuse_together(tmp_path):
    codes, errors, _ = run_failing(2, [dict(K=2, W=2, uneven_k=True)], str(tmp_path), timeout=100)
    for r in range(2):
        assert codes[r] not in (0, None) and "ranks disagree on the micro-step counts" in errors[r], errors[r]


def test_ranks_with_different_plans_refuse_to_start(tmp_path):
    with pytest.raises(Exception, match="block plans differ across ranks"):
        run_sharded(2, [dict(K=1, W=2, shuffle="per_rank")], str(tmp_path))


def test_plan_is_deterministic_balanced_and_cuts_long_sides():
    from distopt.plan import make_plan

    params = [("big", (20, 9)), ("bias", (9,)), ("w", (8, 8))]

    def precond(param, shape):  # matrices rotate both sides, the bias none
        return tuple((d, len(shape) == 2) for d in shape)

    plan = make_plan(params, max_block=8, world_size=3, precond=precond)
    assert plan.digest() == make_plan(params, max_block=8, world_size=3, precond=precond).digest()
    big = plan.of_param(0)
    assert [b.shape for b in big] == [(8, 8), (8, 1), (8, 8), (8, 1), (4, 8), (4, 1)]
    loads = [r["cost"] for r in plan.summary()]
    assert max(loads) <= 1.5 * min(loads), loads
    assert sum(r["numel"] for r in plan.summary()) == 20 * 9 + 9 + 64
    assert 0 in plan.split_params(), "the big matrix spans several owners"
    for r in range(3):  # each share is the owner's blocks back to back, later parameters first
        offsets = [(b.offset, b.numel, -b.param) for b in plan.owned(r)]
        assert [o for o, _, _ in offsets] == [sum(n for _, n, _ in offsets[:i]) for i in range(len(offsets))]
        assert [p for _, _, p in offsets] == sorted(p for _, _, p in offsets)


def test_plan_balances_bytes_as_well_as_compute():
    """Cheap but large Adam-path blocks (an embedding cut into 64 rows) must not pile onto the ranks
    that are lightest in compute: the all-gather slot stays near the mean share."""
    from distopt.plan import make_plan

    params = [("embed", (4096, 64))] + [(f"w{i}", (64, 64)) for i in range(8)]

    def precond(param, shape):
        return tuple((d, param > 0) for d in shape)

    plan = make_plan(params, max_block=64, world_size=4, precond=precond)
    shares = [plan.share(r) for r in range(4)]
    assert plan.slot <= 1.15 * sum(shares) / 4, shares
    loads = [r["cost"] for r in plan.summary()]
    assert max(loads) <= 1.3 * sum(loads) / 4, loads


def test_every_tensor_the_optimizer_makes_is_on_the_gradients_device(tmp_path):
    """Run with 'meta' as the default device (parameters and data explicitly on the CPU): a buffer,
    table or flag created without its gradient's device would be a meta tensor, and adding it to a CPU
    tensor or reducing it with gloo fails. Each run must succeed and equal the unguarded one bit for
    bit, in one process and on two ranks, for the schedules, pair sources, dtypes and blocks."""
    configs: list[dict[str, Any]] = [
        dict(K=4, max_block=4), dict(K=3, dtype="bf16"), dict(K=2, pair_source="ranks", max_grad_norm=0.1),
        dict(K=4, schedule="tree", level="global"), dict(K=2, fop=False)]
    for world in (1, 2):
        runs = [dict(c, W=world, steps=3, meta_default=guard) for c in configs for guard in (False, True)
                if world == 2 or c.get("pair_source") != "ranks"]
        results = run_sharded(world, runs, str(tmp_path / f"w{world}"))
        for plain, guarded in zip(results[0][::2], results[0][1::2], strict=True):
            for a, b in zip(plain["history"][-1], guarded["history"][-1], strict=True):
                assert b.device.type == "cpu" and torch.equal(a, b)
