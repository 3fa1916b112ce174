"""One rank of a loopback distributed test, started by ``mlx.launch`` from test_distributed.py.

Usage: ``mlx.launch -n 2 --backend ring -- python tests/dist_worker.py SCENARIO OUT_DIR [ARGS]``.
Each rank writes ``OUT_DIR/rank{r}.json`` as its very last act, so a missing file means the
rank did not finish. The parent test holds the NumPy reference; nothing here asserts.
"""

from __future__ import annotations  # noqa: I001  (grpo must be imported before mlx)

import json
import sys
from pathlib import Path

import grpo  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np

from grpo.core import distributed as D
from grpo.core.numerics import nanmean
from grpo.io.dist import (
    assert_in_sync,
    barrier,
    fail_fast,
    gather_json,
    init_distributed,
    launched,
)

B, G, T, DIM = 3, 4, 5, 6
STAT_CASES = 5


def full_case(seed: int, world: int) -> dict[str, np.ndarray]:
    """The whole batch of one statistics case; the parent rebuilds it for the reference."""
    rng = np.random.default_rng(seed)
    n = world * B * G
    rewards = rng.normal(size=n).astype(np.float32) * (seed + 1)
    if seed % 2:
        rewards[rng.random(n) < 0.3] = np.nan
    if seed == 3:
        rewards[: B * G] = np.nan  # rank 0 holds no scorable reward at all
    mask = (rng.random((n, T)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0
    feats = rng.normal(size=(n, T, DIM)).astype(np.float32)
    return {"rewards": rewards, "mask": mask, "feats": feats}


def shard(x: np.ndarray, rank: int) -> mx.array:
    return mx.array(x[rank * B * G : (rank + 1) * B * G])


def _dapo_grad(group, feats, mask):
    # Toy per-token loss l = feats @ w; dapo reduces sum(l * m) / num_items_in_batch.
    def loss(w):
        n_hat = D.num_items_in_batch(mask, group=group)
        return ((feats @ w) * mask).sum() / n_hat

    def step(w):
        return D.average_gradients(mx.grad(loss)(w), group=group)

    w = mx.zeros((DIM,))
    return step(w), mx.compile(step)(w)


def _stats_case(group, seed):
    r, world = D.rank(group), D.world_size(group)
    case = full_case(seed, world)
    rewards, mask, feats = (shard(case[k], r) for k in ("rewards", "mask", "feats"))
    mean, std = D.nan_mean_std(rewards, group=group)
    grad, grad_compiled = _dapo_grad(group, feats, mask)
    # Batch-scaled advantages: centred within (local) groups, scaled by the global std.
    grouped = rewards.reshape(B, G)
    adv = mx.nan_to_num((grouped - nanmean(grouped, 1, keepdims=True)) / (std + 1e-4), nan=0.0)
    lengths = mask.sum(axis=1)
    metrics = D.reduce_metrics(
        {
            "tokens_mean": mask.sum(),
            "tokens_sum": mask.sum(),
            "len_max": lengths.max(),
            "len_min": lengths.min(),
        },
        group=group,
        reducers={"len_max": "max", "len_min": "min", "tokens_sum": "sum"},
    )
    return {
        "mean": mean.item(),
        "std": std.item(),
        "num_items": D.num_items_in_batch(mask, group=group).item(),
        "grad": grad.tolist(),
        "grad_compiled": grad_compiled.tolist(),
        "adv": adv.reshape(-1).tolist(),
        "metrics": {k: v.item() for k, v in metrics.items()},
    }


def scenario_collectives(group, out: dict) -> None:
    r = D.rank(group)
    out["rank"], out["world"] = r, D.world_size(group)
    out["all_sum"] = D.all_sum(mx.array([r + 1.0, 10.0]), group=group).tolist()
    out["all_mean"] = D.all_mean(mx.array([r * 4.0]), group=group).tolist()
    out["all_max"] = D.all_max(mx.array([float(r), -float(r)]), group=group).tolist()
    out["all_min"] = D.all_min(mx.array([float(r), -float(r)]), group=group).tolist()
    tree = {"a": mx.full((3,), float(r)), "b": [mx.ones((2, 2)) * (2.0 * r + 1.0)]}
    avg = D.average_gradients(tree, group=group)
    out["avg_a"], out["avg_b"] = avg["a"].tolist(), avg["b"][0].tolist()
    out["key"] = D.rank_key(mx.random.key(7), rank=r).tolist()
    out["div_same"] = D.max_divergence({"p": mx.arange(4).astype(mx.float32)}, group=group).item()
    out["div_rank"] = D.max_divergence({"p": mx.full((4,), 3.0 * r)}, group=group).item()
    out["stats"] = [_stats_case(group, s) for s in range(STAT_CASES)]
    nan = float("nan")
    reduced = D.reduce_metrics(
        {
            "only_rank1": nan if r == 0 else 4.0,
            "nowhere": nan,
            "x/max_len": r + 1.0,
            "clip/low_min": -float(r),
            "s": nan if r == 0 else 2.0,
        },
        group=group,
        reducers={"s": "sum"},
    )
    out["nan_metrics"] = {k: v.item() for k, v in reduced.items()}
    out["gathered"] = gather_json({"rank": r, "pad": "é" * (5 * r)}, group=group)
    out["mismatch"] = _error_of(D.reduce_metrics, {f"name{r}": 1.0}, group=group)
    out["in_sync"] = _error_of(assert_in_sync, {"w": mx.ones((3,))}, group=group)
    out["out_of_sync"] = _error_of(assert_in_sync, {"w": mx.ones((3,)) * r}, group=group)
    barrier(group)


def _error_of(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def scenario_raise(group, out: dict) -> None:
    """Rank 1 fails (as a reward function would) while rank 0 waits in a collective.

    The ``finally`` issues a collective of a different size, as a careless trainer cleanup
    would: without ``fail_fast`` the two mismatched collectives pair up and the job hangs.
    """
    try:
        with fail_fast(group):
            if D.rank(group) == 1:
                raise RuntimeError("reward function 'boom' failed on rank 1")
            mx.eval(D.all_sum(mx.ones(1000), group=group))
    finally:
        barrier(group)
    out["finished"] = True


def advantages_case(seed: int, world: int) -> np.ndarray:
    """``[W*B*G, 2]`` rewards with NaNs (incl. unscorable rows); rebuilt by the parent."""
    rng = np.random.default_rng(100 + seed)
    rewards = rng.normal(size=(world * B * G, 2)).astype(np.float32)
    rewards[rng.random(rewards.shape) < 0.25] = np.nan
    rewards[seed] = np.nan
    return rewards


ADV_VARIANTS = (
    dict(scale="batch"),
    dict(scale="group"),
    dict(scale="batch", aggregation="normalize_then_sum"),
)


def scenario_advantages(group, out: dict) -> None:
    """``make_advantages(group=...)`` on each rank's shard (needs the advantages hook)."""
    from grpo.core.advantages import make_advantages

    r, world = D.rank(group), D.world_size(group)
    weights = mx.array([1.0, 0.5])
    out["cases"] = []
    for seed in range(3):
        local = shard(advantages_case(seed, world), r)
        for variant in ADV_VARIANTS:
            fn = make_advantages(group_size=G, group=group, **variant)
            adv = fn(local, weights)
            out["cases"].append({"adv": adv.advantages.tolist(), "zero": adv.is_std_zero.tolist()})


SCENARIOS = {
    "collectives": scenario_collectives,
    "raise": scenario_raise,
    "advantages": scenario_advantages,
}


def main(argv: list[str]) -> None:
    name, out_dir, *rest = argv
    group = init_distributed(backend="ring" if launched() else "any")
    out: dict = {}
    if name in SCENARIOS:
        SCENARIOS[name](group, out)
    else:
        import dist_train_worker  # phase-2 scenarios live next to this file

        dist_train_worker.run(name, group, out, Path(out_dir), rest)
    path = Path(out_dir) / f"rank{D.rank(group)}.json"
    path.write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
