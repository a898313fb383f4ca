"""bench.tower_probe's pieces: the image set and the probe itself (the benchmark runs on real towers)."""

import pytest

torch = pytest.importorskip("torch")

from bench.tower_probe import fit_probe, probe_images  # noqa: E402


def test_probe_separates_separable_features_and_ignores_noise():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(200) % 2).float()
    signal = labels * 2.0 - 1.0 + 0.3 * torch.randn(200, generator=generator)  # one informative feature
    noise = torch.randn(200, 5, generator=generator) * 10.0  # large, uninformative
    features = torch.cat([signal[:, None], noise], dim=1)
    logits = fit_probe(features[:100], labels[:100])(features[100:])
    assert ((logits > 0).float() == labels[100:]).float().mean() >= 0.95


def test_probe_images_are_fresh_half_empty_and_labelled():
    images, present = probe_images(n=40, seed=3, difficulty=(0.6, 0.9), image_size=56)
    assert len(images) == 40 and images[0].shape == (56, 56, 3)
    assert 10 <= sum(present) <= 30
    again, present_again = probe_images(n=40, seed=3, difficulty=(0.6, 0.9), image_size=56)
    assert present_again == present and (again[7] == images[7]).all()  # a seed gives the same set
