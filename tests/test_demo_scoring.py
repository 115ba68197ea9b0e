"""The demo scoring (tests/demo_scoring.py) that test_learning and the demo_quality benchmark rely on:
a photo's own crop scores as its photo, someone else's does not, and a featureless image is not counted."""

from __future__ import annotations

import pytest
import torch

from sd3.config.presets import DEMO_CAPTIONS
from tests.data_helpers import demo_dataset
from tests.demo_scoring import nearest_photo_accuracy, photo_crops, score_samples


@pytest.fixture(scope="module")
def crops():
    return photo_crops(demo_dataset(), res=64)


def test_every_photo_has_square_crops(crops):
    assert sorted(crops) == sorted(DEMO_CAPTIONS)
    assert all(c.shape[1:] == (3, 64, 64) and c.shape[0] >= 2 and c.min() >= 0 and c.max() <= 1
               for c in crops.values())
    with pytest.raises(ValueError, match="no 56x56 rows"):
        photo_crops(demo_dataset(), res=56)


def test_a_crop_scores_as_its_own_photo_and_not_as_another(crops):
    names = list(crops)
    samples = torch.stack([crops[n][0] for n in names])
    right = score_samples(samples, own=names, crops=crops)
    assert all(s.nearest == s.own and s.margin > 0 and s.own_mse == 0 and s.psnr_db >= 99 for s in right)
    shifted = names[1:] + names[:1]                                   # each sample named after another photo
    wrong = score_samples(samples, own=shifted, crops=crops)
    assert all(s.nearest != s.own and s.margin < 0 and s.psnr_db < 30 for s in wrong)
    assert nearest_photo_accuracy(samples, names, crops) == 1.0
    assert nearest_photo_accuracy(samples, shifted, crops) == 0.0


def test_a_flat_image_matches_at_most_one_photo(crops):
    """Mid grey for every caption: one photo is nearest for all of them, so at most one hit."""
    names = list(crops)
    grey = torch.full((len(names), 3, 64, 64), 0.5)
    assert nearest_photo_accuracy(grey, names, crops) <= 1 / len(names)
    with pytest.raises(ValueError, match="no crops of nosuchphoto"):
        score_samples(grey[:1], own=["nosuchphoto"], crops=crops)
