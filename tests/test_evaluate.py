"""Sample-quality metrics against closed forms; the extractor in eval mode; statistics over all samples."""

import math

import numpy as np
import pytest
import torch

from ddpmlab.data import InMemoryDataset, load_mnist
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate import (
    Extractor,
    classifier_extractor,
    extract,
    feature_sums,
    fid,
    inception_score,
    kid,
    mmd_rbf,
    precision_recall,
    reference_statistics,
    sliced_wasserstein,
)
from ddpmlab.evaluate.features import batches


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_closed_form(mu1, s1, mu2, s2) -> float:
    # d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)  (Dowson & Landau 1982)
    r = _sqrtm_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * _sqrtm_psd(r @ s2 @ r)))


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def test_frechet_distance_of_gaussian_features_equals_the_closed_form():
    rng = np.random.default_rng(0)
    d = 4
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    f1 = torch.from_numpy(rng.multivariate_normal(mu1, s1, 20000))
    f2 = torch.from_numpy(rng.multivariate_normal(mu2, s2, 20000))
    got = fid(feature_sums(f1), f2)
    # exactly the formula on the sample statistics ...
    exact = frechet_closed_form(f1.mean(0).numpy(), np.cov(f1.numpy().T), f2.mean(0).numpy(), np.cov(f2.numpy().T))
    assert got == pytest.approx(exact, rel=1e-6)
    # ... and close to the formula on the true parameters
    assert got == pytest.approx(frechet_closed_form(mu1, s1, mu2, s2), rel=0.05)


def test_frechet_distance_of_commuting_gaussians():
    # diagonal covariances: d^2 = |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    g = torch.Generator().manual_seed(1)
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    mu = torch.tensor([1.0, 0.0, -2.0])
    f1 = torch.randn(60000, 3, generator=g, dtype=torch.float64) * a.sqrt()
    f2 = torch.randn(60000, 3, generator=g, dtype=torch.float64) * b.sqrt() + mu
    expected = float((mu ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())  # 5 + 1 + 1 = 7
    assert fid(feature_sums(f1), f2) == pytest.approx(expected, rel=0.03)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    x_train, _ = load_mnist("train")
    x_test, y_test = load_mnist("test")
    ext = classifier_extractor()
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:1000]
    ref, _ = extract(ext, batches(x_train[idx], 500), progress=False)
    return ext, feature_sums(ref), ref, x_test, y_test


def test_fid_of_a_set_against_itself_is_zero(digits):
    ext, _, _, x, _ = digits
    f, _ = extract(ext, batches(x, 250), progress=False)
    assert abs(fid(feature_sums(f), f)) < 1e-6


def test_fid_grows_monotonically_with_added_noise(digits):
    ext, ref_sums, _, x, _ = digits
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    values = []
    for sigma in (0.0, 0.15, 0.4, 0.8):
        f, _ = extract(ext, batches((x + sigma * noise).clamp(-1, 1), 250), progress=False)
        values.append(fid(ref_sums, f))
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > 20 * values[0], values  # noise, not sampling error, dominates


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    g = torch.Generator().manual_seed(0)
    d, m, pairs = 8, 100, 40
    vals = []
    for k in range(pairs):
        a = torch.randn(m, d, generator=g, dtype=torch.float64)
        b = torch.randn(m, d, generator=g, dtype=torch.float64)
        vals.append(kid(a, b, subsets=1, subset_size=m, seed=k)[0])
    vals = torch.tensor(vals)
    se = vals.std() / math.sqrt(pairs)
    assert abs(vals.mean()) < 3 * se, (vals.mean(), se)
    # the biased (V-statistic) estimate would sit at ~2 (E k(x,x) - E k(x,y)) / m, far outside that band
    kxx = ((torch.randn(10000, d, generator=g).pow(2).sum(1) / d + 1) ** 3).mean()
    assert 2 * (kxx - 1) / m > 6 * se
    # and a real difference is detected
    shifted = kid(torch.randn(500, d, generator=g), torch.randn(500, d, generator=g) + 0.5, 20, 200)[0]
    assert shifted > 20 * se


def test_extractor_is_locked_in_eval_mode(digits):
    _, _, _, x, _ = digits
    from ddpmlab.evaluate.classifier import load_mnist_classifier

    net = load_mnist_classifier().train()  # batch norm in training mode: features depend on the batch
    assert not torch.allclose(net.features(x[:1]), net.features(x[:64])[:1], atol=1e-4)
    ext = Extractor(net, "classifier", "test", 128, (1, 28, 28)).train()
    assert not ext.training and not net.training
    one, _ = extract(ext, [x[:1]], progress=False)
    many, _ = extract(ext, [x[:64]], progress=False)
    assert torch.allclose(one, many[:1], atol=1e-5)


def test_statistics_use_every_sample_not_one_batch(digits, tmp_path):
    ext, _, _, x, y = digits
    ds = InMemoryDataset(x[:300], y[:300], is_image=True)
    ref = reference_statistics(ds, ext, "test digits", cache_dir=tmp_path, batch_size=64, progress=False)
    full = ext(x[:300]).double()
    assert ref.n == 300 and len(ref.features) == 300
    assert torch.allclose(ref.sums["sum"], full.sum(0), rtol=1e-5)
    assert torch.allclose(ref.sums["cov_sum"], full.T @ full, rtol=1e-5)


def test_reference_statistics_are_cached_by_content_and_extractor(digits, tmp_path):
    ext, _, _, x, y = digits
    ds = InMemoryDataset(x[:200].clone(), y[:200], is_image=True)
    first = reference_statistics(ds, ext, "d", cache_dir=tmp_path, progress=False)
    again = reference_statistics(ds, ext, "d", cache_dir=tmp_path, progress=False)
    assert not first.cached and again.cached and again.key == first.key
    assert torch.equal(again.sums["cov_sum"], first.sums["cov_sum"])
    ds.x[0, 0, 0, 0] += 0.5  # one pixel changed: new content, new entry
    changed = reference_statistics(ds, ext, "d", cache_dir=tmp_path, progress=False)
    assert not changed.cached and changed.key != first.key
    other = Extractor(ext.net, "classifier", "another-weights-hash", 128, (1, 28, 28))
    assert reference_statistics(ds, other, "d", cache_dir=tmp_path, progress=False).key != changed.key


def test_the_data_baseline_is_scored_against_the_other_images_only(digits, tmp_path):
    from ddpmlab.evaluate.reference import without

    ext, _, _, x, y = digits
    ds = InMemoryDataset(x[:300], y[:300], is_image=True)
    ref = reference_statistics(ds, ext, "d", cache_dir=tmp_path, progress=False)
    base = torch.tensor([3, 50, 299])
    rest = torch.tensor([i for i in range(300) if i not in base.tolist()])
    held = without(ref, base, ext(x[base]))
    expected = feature_sums(ext(x[rest]))
    assert held.n == 297 and torch.equal(held.index, rest)
    assert torch.allclose(held.sums["sum"], expected["sum"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(held.sums["cov_sum"], expected["cov_sum"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(held.features, ext(x[rest]), atol=1e-5)


def test_fid_refuses_fewer_samples_than_feature_dimensions(digits):
    _, ref_sums, ref, _, _ = digits
    with pytest.raises(DDPMError, match="more than 128 samples"):
        fid(ref_sums, ref[:100])


def test_precision_and_recall_of_known_supports():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 50.0) == (0.0, 0.0)
    # half of the real support (x > 0): every generated point is real, half the real points are covered
    p, r = precision_recall(real, real[real[:, 0] > 0])
    assert p == 1.0 and 0.45 < r < 0.6


@pytest.mark.filterwarnings("ignore::UserWarning")  # the std of a single split
def test_inception_score_of_confident_balanced_and_collapsed_predictions():
    k = 10
    confident = 50.0 * torch.eye(k).repeat(100, 1)  # 1000 samples, each sure of one class, classes balanced
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-3)
    collapsed = 50.0 * torch.eye(k)[[3] * 1000]
    assert inception_score(collapsed, splits=5)[0] == pytest.approx(1.0, abs=1e-3)


def test_sliced_wasserstein_of_shifted_gaussians():
    # every projection of N(0, I) vs N(m, I) is a shift by theta.m: SW_2^2 = E(theta.m)^2 = |m|^2 / 2 in 2-D
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([1.5, -0.5])
    x = torch.randn(5000, 2, generator=g)
    y = torch.randn(5000, 2, generator=g) + m
    got = sliced_wasserstein(x, y, n_projections=256, generator=g)
    assert got == pytest.approx(float(m.norm()) / math.sqrt(2), rel=0.05)
    assert sliced_wasserstein(x, torch.randn(4000, 2, generator=g), generator=g) < 0.08  # unequal sizes too


def test_mmd_matches_the_gaussian_closed_form_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    h, d, m = 1.0, 2, torch.tensor([1.0, 0.0])

    def expected_k(delta2, s2):  # E exp(-|a-b|^2 / 2h^2) for a - b ~ N(delta, s2 I) in d dims
        c = h * h / (h * h + s2)
        return c ** (d / 2) * math.exp(-delta2 / (2 * (h * h + s2)))

    truth = expected_k(0, 2) + expected_k(0, 2) - 2 * expected_k(float(m @ m), 2)
    x, y = torch.randn(3000, 2, generator=g), torch.randn(3000, 2, generator=g) + m
    assert mmd_rbf(x, y, bandwidths=(h,)) == pytest.approx(truth, rel=0.1)
    same = torch.tensor([mmd_rbf(torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g))
                         for _ in range(30)])
    assert abs(same.mean()) < 3 * same.std() / math.sqrt(30)
