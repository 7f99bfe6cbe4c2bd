"""The math core against independent computations (torch.linalg.svd, numpy polyfit)."""

import numpy as np
import pytest
import torch

from relex_callback.math.core import (
    backtest,
    backtest_errors,
    combine,
    fit_trajectory,
    fit_trend,
    gram_matrix,
    prediction_weights,
    r_squared,
    reconstruction_weights,
    subspace_from_gram,
)


def trajectory(steps, dim=2000, noise=0.01, seed=0, rank=1, slope=0.05, intercept=0.1, curve=0.0):
    """Δ_t = Σ_i (intercept + slope·x + curve·x²)·v_i + noise, with orthonormal v_i."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(steps, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))[0].T
    coef = torch.stack([(intercept + slope * x + curve * x * x) / (i + 1) for i in range(rank)], 1)
    return (coef @ basis + noise * torch.randn(len(steps), dim, generator=gen, dtype=torch.float64)).float()


def oracle_prediction(deltas, steps, target, rank=1, degree=1):
    """Independent RELEX: SVD of the stacked deltas, numpy polyfit of c = M v on the step numbers."""
    m = deltas.double()
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    out = torch.zeros(m.shape[1], dtype=torch.float64)
    for i in range(rank):
        v = vh[i]
        c = (m @ v).numpy()
        poly = np.polyfit(np.asarray(steps, dtype=np.float64), c, degree)
        out += float(np.polyval(poly, target)) * v
    return out


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_singular_values_and_explained_variance_match_svd(rank):
    m = trajectory(range(1, 13), rank=3, noise=0.02)
    sub = subspace_from_gram(gram_matrix(m), rank)
    s = torch.linalg.svdvals(m.double())
    torch.testing.assert_close(sub.singular_values, s[:rank], rtol=1e-5, atol=1e-8)
    assert sub.explained_variance == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-6)
    # coefficients U Σ equal the projections M v (up to the sign of each v)
    _, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    proj = m.double() @ vh[:rank].T
    torch.testing.assert_close(sub.coefficients.abs(), proj.abs(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_elements", [64, 6 * 4096 + 6, None])
def test_gram_and_combine_chunking_match_one_matmul(dtype, chunk_elements):
    # 5003 columns: a partial last chunk and a partial last block reuse the scratch buffer with a smaller view
    m = trajectory(range(1, 7), dim=5003 * 3).to(dtype)
    ref = m.double() @ m.double().T
    torch.testing.assert_close(gram_matrix(m, chunk_elements=chunk_elements, block=1000), ref, rtol=1e-6, atol=1e-6)
    w = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(combine(m, w, chunk_elements=chunk_elements).double(), w @ m.double(), rtol=1e-5, atol=1e-6)


def test_bad_chunk_elements_raises():
    with pytest.raises(ValueError, match="chunk_elements must be >= 1"):
        gram_matrix(torch.zeros(2, 8), chunk_elements=0)


def test_batched_fit_equals_per_tensor_fits():
    # fit_trajectory solves all tensors at once; each must equal its own one-tensor eigh + lstsq + weights
    steps = [1.0, 2.0, 4.0, 5.0, 7.0, 8.0]
    stacks = [trajectory(steps, dim=300 + 17 * i, rank=1 + i % 2, noise=0.02 * i) for i in range(5)]
    stacks.append(torch.zeros(6, 40))  # a tensor that never moved
    grams = [(f"t{i}", gram_matrix(m)) for i, m in enumerate(stacks)]
    for kind, power in (("linear", 1.0), ("power", 0.5), ("poly2", 1.0)):
        fit = fit_trajectory(grams, steps, [10.0, 30.0], rank=2, kind=kind, power=power)
        for (name, gram), tensor_fit in zip(grams, fit.tensors):
            sub = subspace_from_gram(gram, 2)
            trend = fit_trend(steps, sub.coefficients, kind=kind, power=power)
            assert tensor_fit.name == name
            torch.testing.assert_close(tensor_fit.subspace.singular_values, sub.singular_values, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tensor_fit.weights, prediction_weights(sub, trend([10.0, 30.0])), rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(tensor_fit.r2, r_squared(steps, sub.coefficients, trend), rtol=1e-8, atol=1e-10)
        per_tensor = [backtest_errors(g, steps, 3, rank=2, kind=kind, power=power) for _, g in grams]
        err = sum(float(e[-1]) for e, _ in per_tensor)
        norm = sum(float(n[-1]) for _, n in per_tensor)
        assert fit.backtest.num_fit == 3
        assert fit.backtest.distance == pytest.approx((err / norm) ** 0.5, rel=1e-9)


@pytest.mark.parametrize("rank", [1, 2])
def test_prediction_equals_svd_and_polyfit_oracle(rank):
    steps = list(range(1, 21))
    m = trajectory(steps, rank=rank, noise=0.005)
    fit = fit_trajectory([("w", gram_matrix(m))], steps, [100.0], rank=rank)
    pred = combine(m, fit.tensors[0].weights)[0].double()
    ref = oracle_prediction(m, steps, 100.0, rank=rank)
    assert (pred - ref).abs().max() < 1e-5 * ref.abs().max()


def test_official_index_axis_equals_real_step_axis():
    """Official code regresses on index 0..T-1 and evaluates at K-1; real steps 1..T give the same line."""
    steps = list(range(1, 16))
    m = trajectory(steps, noise=0.01)
    sub = subspace_from_gram(gram_matrix(m), 1)
    on_steps = fit_trend(steps, sub.coefficients)([500.0])
    on_index = fit_trend(list(range(15)), sub.coefficients)([499.0])
    torch.testing.assert_close(on_steps, on_index, rtol=1e-10, atol=1e-12)


def test_sparse_snapshots_predict_the_same_line():
    """Snapshots every 5th step of an exactly linear trajectory give the exact prediction at K."""
    dense = list(range(1, 31))
    sparse = dense[4::5]
    m_dense = trajectory(dense, noise=0.0)
    m_sparse = m_dense[4::5]
    truth = trajectory([300], noise=0.0)[0].double()
    for steps, m in ((dense, m_dense), (sparse, m_sparse)):
        fit = fit_trajectory([("w", gram_matrix(m))], steps, [300.0])
        pred = combine(m, fit.tensors[0].weights)[0].double()
        assert (pred - truth).abs().max() < 1e-4 * truth.abs().max()
    # negative control: treating the sparse snapshots as consecutive steps (the official index axis) is wrong
    fit_index = fit_trajectory([("w", gram_matrix(m_sparse))], list(range(1, 7)), [300.0])
    wrong = combine(m_sparse, fit_index.tensors[0].weights)[0].double()
    assert (wrong - truth).norm() > 0.5 * truth.norm()


def test_zero_change_tensor_stays_at_base():
    m = torch.zeros(8, 100)
    fit = fit_trajectory([("frozen", gram_matrix(m))], list(range(1, 9)), [50.0])
    tensor_fit = fit.tensors[0]
    assert tensor_fit.explained_variance == 0.0
    assert torch.count_nonzero(tensor_fit.weights) == 0
    assert torch.count_nonzero(combine(m, tensor_fit.weights)) == 0


def test_reconstruction_is_the_rank_r_projection():
    m = trajectory(range(1, 11), rank=3, noise=0.05)
    for rank in (1, 2):
        rec = combine(m, reconstruction_weights(subspace_from_gram(gram_matrix(m), rank))).double()
        _, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
        ref = m.double() @ vh[:rank].T @ vh[:rank]
        torch.testing.assert_close(rec, ref, rtol=1e-5, atol=1e-5)


def test_r_squared_matches_numpy():
    x = np.arange(1, 11, dtype=np.float64)
    c = 0.3 * x + np.sin(x)
    trend = fit_trend(x, torch.from_numpy(c))
    poly = np.polyfit(x, c, 1)
    ss_res = ((c - np.polyval(poly, x)) ** 2).sum()
    ss_tot = ((c - c.mean()) ** 2).sum()
    assert float(r_squared(x, torch.from_numpy(c), trend)[0]) == pytest.approx(1 - ss_res / ss_tot, rel=1e-9)


def test_power_trend_recovers_sqrt_growth_and_line_overshoots():
    x = torch.arange(1, 21, dtype=torch.float64)
    c = 0.2 + 1.5 * x.sqrt()
    power = fit_trend(x, c, kind="power", power=0.5, origin=0.0)
    assert float(power([200.0])[0, 0]) == pytest.approx(0.2 + 1.5 * 200**0.5, rel=1e-9)
    line = fit_trend(x, c, kind="linear")
    assert float(line([200.0])[0, 0]) > 1.5 * (0.2 + 1.5 * 200**0.5)
    # p = 1 is exactly the paper's line
    torch.testing.assert_close(fit_trend(x, c, kind="power", power=1.0)([200.0]), line([200.0]))


def test_poly2_matches_numpy_polyfit():
    x = np.arange(1, 13, dtype=np.float64)
    c = 0.1 + 0.4 * x - 0.01 * x * x + 0.01 * np.cos(x)
    ref = np.polyval(np.polyfit(x, c, 2), 40.0)
    assert float(fit_trend(x, torch.from_numpy(c), kind="poly2")([40.0])[0, 0]) == pytest.approx(ref, rel=1e-8)


def test_backtest_from_gram_matches_explicit_refit():
    steps = list(range(1, 13))
    m = trajectory(steps, noise=0.03, curve=-0.002)
    num_fit = 6
    sq_err, sq_norm = backtest_errors(gram_matrix(m), steps, num_fit)
    ref = [oracle_prediction(m[:num_fit], steps[:num_fit], s) for s in steps[num_fit:]]
    ref_err = torch.stack([((r - m[num_fit + i].double()) ** 2).sum() for i, r in enumerate(ref)])
    torch.testing.assert_close(sq_err, ref_err, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(sq_norm, (m[num_fit:].double() ** 2).sum(1), rtol=1e-6, atol=1e-8)


def test_backtest_flags_a_bending_trajectory_but_not_a_straight_one():
    steps = list(range(1, 21))
    straight = backtest([gram_matrix(trajectory(steps, noise=0.001))], steps)
    bending = backtest([gram_matrix(trajectory(steps, noise=0.001, slope=0.05, curve=-0.0024))], steps)
    assert straight.ratio == pytest.approx(2.0)
    assert straight.distance < 0.1  # only the isotropic noise (0.001·√2000 ≈ 0.045 of ||Δ||)
    assert bending.distance > 5 * straight.distance
    assert bending.supported_ratio(0.75) < straight.supported_ratio(0.75)


def test_sharded_gram_sum_gives_the_unsharded_prediction():
    """The fit needs only the sum of per-slice Grams; each slice then combines its own part."""
    steps = list(range(1, 11))
    m = trajectory(steps, dim=1001, noise=0.02)
    whole = fit_trajectory([("w", gram_matrix(m))], steps, [60.0])
    parts = [m[:, :400], m[:, 400:]]
    summed = gram_matrix(parts[0]) + gram_matrix(parts[1])
    shard_fit = fit_trajectory([("w", summed)], steps, [60.0])
    pred = torch.cat([combine(p, shard_fit.tensors[0].weights) for p in parts], dim=1)
    torch.testing.assert_close(pred, combine(m, whole.tensors[0].weights), rtol=1e-5, atol=1e-6)


def test_fit_trend_rejects_too_few_points():
    with pytest.raises(ValueError, match="needs at least 3 snapshots"):
        fit_trend([1.0, 2.0], torch.ones(2, 1), kind="poly2")
