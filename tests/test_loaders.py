from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ctirf_live.config import Optics
from ctirf_live.data.dataset import DatasetError, PairedDataset
from ctirf_live.data.loaders import (
    SYMMETRIES,
    CropDataset,
    FramePair,
    PairSource,
    split_by_field,
    transform,
)
from ctirf_live.data.normalize import normalize


def _structured(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Sparse bright filaments-like blobs on a dim floor, float32."""
    spots = (rng.random(shape) > 0.995).astype(np.float32) * 5000
    return (ndimage.gaussian_filter(spots, 1.5) + 100).astype(np.float32)


def _source(n: int = 4, shape: tuple[int, int] = (96, 80), fields: list[str] | None = None):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        tirf = _structured(rng, shape)
        epi = (ndimage.gaussian_filter(tirf, 4) + 0.5 * tirf.mean()).astype(np.float32)
        pairs.append(FramePair(epi, tirf, fields[i] if fields else f"f{i}"))
    return PairSource(pairs, Optics(), "toy")


def test_crops_have_the_crop_shape_and_are_deterministic_per_seed() -> None:
    src = _source()
    a = CropDataset(src, crop=32, seed=3, samples_per_epoch=10)
    b = CropDataset(src, crop=32, seed=3, samples_per_epoch=10)
    c = CropDataset(src, crop=32, seed=4, samples_per_epoch=10)
    assert len(a) == 10
    item = a[7]
    assert item["epi"].shape == item["tirf"].shape == (1, 32, 32)
    assert item["epi"].dtype == torch.float32 and item["weight"].shape == ()
    assert item["frame"] == 7 % len(src)
    for i in range(10):
        assert torch.equal(a[i]["epi"], b[i]["epi"]) and torch.equal(a[i]["tirf"], b[i]["tirf"])
    assert any(not torch.equal(a[i]["epi"], c[i]["epi"]) for i in range(10))
    first = [a.plan(i) for i in range(10)]
    a.set_epoch(1)
    assert [a.plan(i) for i in range(10)] != first


def test_crops_come_from_the_whole_frame_normalisation_and_stay_in_unit_range() -> None:
    src = _source()
    ds = CropDataset(src, crop=32, rotation_probability=0.0, seed=0, samples_per_epoch=8)
    for i in range(8):
        frame, y0, x0, symmetry = ds.plan(i)
        assert symmetry is None
        item = ds[i]
        for key in ("epi", "tirf"):
            values = item[key]
            assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
            whole, _ = normalize(getattr(src[frame], key))
            np.testing.assert_allclose(
                values[0].numpy(), whole[y0 : y0 + 32, x0 : x0 + 32], rtol=1e-6
            )


def test_target_ceiling_keeps_bright_tirf_above_one_and_inputs_stay_eq1() -> None:
    src = _source()
    eq1 = CropDataset(src, crop=32, rotation_probability=0.0, seed=0, samples_per_epoch=8)
    free = CropDataset(
        src, crop=32, rotation_probability=0.0, seed=0, samples_per_epoch=8, target_ceiling=None
    )
    capped = CropDataset(
        src, crop=32, rotation_probability=0.0, seed=0, samples_per_epoch=8, target_ceiling=1.5
    )
    frame = 0
    whole = free._normalised(frame, "tirf")
    assert whole.max() > 1.5  # the toy's blobs are well above the 98th percentile
    np.testing.assert_allclose(whole, src[frame].tirf / free.scales[frame][1], rtol=1e-6)
    assert capped._normalised(frame, "tirf").max() == pytest.approx(1.5)
    assert eq1._normalised(frame, "tirf").max() == pytest.approx(1.0)
    for i in range(8):
        assert torch.equal(free[i]["epi"], eq1[i]["epi"])
        assert float(free[i]["epi"].max()) <= 1.0


def test_target_ceiling_must_be_positive() -> None:
    with pytest.raises(ValueError, match="target_ceiling"):
        CropDataset(_source(), crop=32, target_ceiling=0.0)


def test_rotation_happens_with_the_requested_probability_and_is_applied() -> None:
    src = _source()
    ds = CropDataset(src, crop=32, rotation_probability=0.8, seed=1, samples_per_epoch=3000)
    plans = [ds.plan(i) for i in range(3000)]
    rate = np.mean([p[3] is not None for p in plans])
    assert abs(rate - 0.8) < 0.03
    used = {p[3] for p in plans if p[3] is not None}
    assert used == set(SYMMETRIES)
    index = next(i for i, p in enumerate(plans) if p[3] not in (None, (2, False)))
    frame, y0, x0, symmetry = plans[index]
    whole, _ = normalize(src[frame].epi)
    expected = transform(whole[y0 : y0 + 32, x0 : x0 + 32], symmetry)
    np.testing.assert_allclose(ds[index]["epi"][0].numpy(), expected, rtol=1e-6)
    assert not np.allclose(expected, whole[y0 : y0 + 32, x0 : x0 + 32])
    never = CropDataset(src, crop=32, rotation_probability=0.0, samples_per_epoch=200)
    assert all(never.plan(i)[3] is None for i in range(200))


def _structured_and_flat() -> PairSource:
    """A structured pair and a flat one (as an out-of-focus field would be)."""
    rng = np.random.default_rng(2)
    structured = _structured(rng, (64, 64))
    flat = (1000 + rng.normal(0, 5, (64, 64))).astype(np.float32)
    return PairSource(
        [FramePair(structured, structured, "a"), FramePair(flat, flat, "b")], Optics(), "toy"
    )


def test_variance_weight_is_larger_for_structured_tirf_than_for_flat() -> None:
    src = _structured_and_flat()
    ds = CropDataset(src, crop=64, augment=False)
    w_structured, w_flat = float(ds[0]["weight"]), float(ds[1]["weight"])
    assert w_structured > 5 * w_flat
    assert w_structured + w_flat == pytest.approx(2.0, rel=1e-4)


def test_literal_variance_scaling_multiplies_the_tirf_target_instead() -> None:
    src = _structured_and_flat()
    weighted = CropDataset(src, crop=64, augment=False)
    literal = CropDataset(src, crop=64, augment=False, variance_scaling="target")
    plain = CropDataset(src, crop=64, augment=False, variance_scaling="none")
    for i in (0, 1):
        w = float(weighted[i]["weight"])
        assert float(literal[i]["weight"]) == float(plain[i]["weight"]) == 1.0
        np.testing.assert_allclose(
            literal[i]["tirf"].numpy(), w * plain[i]["tirf"].numpy(), rtol=1e-5
        )
        np.testing.assert_array_equal(literal[i]["epi"].numpy(), plain[i]["epi"].numpy())
    with pytest.raises(ValueError, match="variance_scaling"):
        CropDataset(src, crop=64, variance_scaling="square")


def test_validation_crops_are_centred_and_unrotated() -> None:
    src = _source(shape=(96, 80))
    ds = CropDataset(src, crop=32, seed=5, augment=False, samples_per_epoch=99)
    assert len(ds) == len(src)
    assert ds.plan(1) == (1, 32, 24, None)
    ds.set_epoch(4)
    assert ds.plan(1) == (1, 32, 24, None)


def test_crop_larger_than_frames_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match="larger than the frames"):
        CropDataset(_source(shape=(64, 64)), crop=96)


def test_split_by_field_never_shares_a_field() -> None:
    fields = [f"f{i // 3}" for i in range(15)]  # 5 fields, 3 pairs each
    src = _source(n=15, shape=(32, 32), fields=fields)
    train, val = split_by_field(src, 0.4, seed=7)
    assert len(train) + len(val) == 15
    assert set(train.fields).isdisjoint(val.fields)
    assert len(set(val.fields)) == 2
    _, again_val = split_by_field(src, 0.4, seed=7)
    assert again_val.fields == val.fields
    _, tiny_val = split_by_field(src, 0.01, seed=7)
    assert len(set(tiny_val.fields)) == 1
    _, none_val = split_by_field(src, 0.0, seed=7)
    assert len(none_val) == 0


def test_from_dataset_groups_overlapping_fields_and_checks_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ds = PairedDataset.create(tmp_path / "ds", Optics())
    frame = rng.integers(100, 4000, (64, 64), dtype=np.uint16)
    for x in (0.0, 2.0, 500.0):  # 64 px * 97.5 nm = 6.2 um: the first two overlap
        ds.add_pair(frame, frame, {"x": x, "y": 0.0}, (0.0, 0.0), 1.0)
    src = PairSource.from_dataset(tmp_path / "ds")
    assert len(src) == 3 and src.optics == Optics() and src.description == str(tmp_path / "ds")
    assert src.fields[0] == src.fields[1] != src.fields[2]
    assert src[0].epi.dtype == np.float32 and not src.has_truth
    ds.add_pair(frame[:32], frame[:32], {"x": 900.0, "y": 0.0}, (0.0, 0.0), 1.0)
    with pytest.raises(DatasetError, match=r"different frame shapes: 64x64 \(3 pairs.*32x64"):
        PairSource.from_dataset(tmp_path / "ds")
    PairedDataset.create(tmp_path / "empty", Optics())
    with pytest.raises(DatasetError, match="has no pairs"):
        PairSource.from_dataset(tmp_path / "empty")


def test_non_finite_frames_are_refused() -> None:
    bad = np.ones((32, 32), np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        PairSource([FramePair(bad, np.ones_like(bad), "x")], Optics(), "toy")


def test_synthetic_pairs_are_distinct_fields_with_sharper_tirf() -> None:
    src = PairSource.synthetic(3, "60X", seed=1, roi=96, progress=False)
    assert len(src) == 3 and len(set(src.fields)) == 3
    assert src.optics.objective == "60X" and src.has_truth
    for pair in src.pairs:
        assert pair.epi.shape == pair.tirf.shape == pair.truth.shape == (96, 96)
        epi, _ = normalize(pair.epi)
        tirf, _ = normalize(pair.tirf)
        assert np.abs(epi - tirf).mean() > 0.05
        # EPI carries out-of-focus haze: TIRF follows the noise-free in-focus truth closely
        truth = pair.truth.ravel()
        r_tirf = np.corrcoef(pair.tirf.ravel(), truth)[0, 1]
        r_epi = np.corrcoef(pair.epi.ravel(), truth)[0, 1]
        assert r_tirf > 0.9 and r_tirf > r_epi + 0.1
    other = PairSource.synthetic(1, "100X", seed=1, roi=64, progress=False)
    assert other.optics.objective == "100X"
