"""The capacity probe trains on the sectioning test's layout, never on its noise frames."""

import numpy as np

from benchmarks.probe_sectioning_capacity import scene_pairs
from ctirf_live.evaluation.sectioning import build_scene, scene_specimen


def test_scene_specimen_holds_the_test_filaments_at_their_rows() -> None:
    spec = scene_specimen(seed=11)
    added = spec.lines - spec.base
    assert added.min() >= 0
    planes_with_lines = np.nonzero(added.reshape(len(added), -1).sum(axis=1))[0]
    assert len(planes_with_lines) == 5  # z = 0, 0.2, 0.5, 1, 2 um
    assert len(spec.rows) == 10 and len(set(spec.rows.values())) == 10


def test_memorize_snaps_are_other_noise_realisations_of_the_test_field() -> None:
    pairs, optics = scene_pairs([11], 2)
    scene = build_scene(seed=11)
    assert optics.pixel_size_um == scene.pixel_size_um
    assert pairs[0].epi.shape == scene.epi.shape
    for pair in pairs:
        assert not np.array_equal(pair.epi, scene.epi)
        # the same specimen (at another exposure): the truth follows the test's TIRF reference
        r = np.corrcoef(pair.truth.ravel(), scene.references["tirf"][0].ravel())[0, 1]
        assert r > 0.999
    assert not np.array_equal(pairs[0].epi, pairs[1].epi)
