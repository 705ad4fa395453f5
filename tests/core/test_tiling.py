"""core.tiling: exact blending, termination on every shape, the official Gaussian."""

import math

import pytest
import torch

from swiftstep.core.tiling import gaussian_weights, tile_starts, tiled_apply

from ..tolerance import assert_close_to_scale


@pytest.mark.parametrize("length,tile,overlap", [(96, 96, 32), (200, 96, 32), (97, 96, 95), (40, 8, 8),
                                                 (40, 8, 20), (5, 3, 0)])
def test_tile_starts_cover_and_terminate(length, tile, overlap):
    starts = tile_starts(length, min(tile, length), overlap)
    t = min(tile, length)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s:s + t] = True
    assert covered.all() and starts == sorted(set(starts)) and starts[-1] == length - t


def test_gaussian_is_the_official_formula():
    w = gaussian_weights(5, 7, var=0.01)
    def g(n, x):
        return math.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / 0.02) / math.sqrt(2 * math.pi * 0.01)
    assert w[1, 4].item() == pytest.approx(g(5, 1) * g(7, 4), rel=1e-6)


@pytest.mark.parametrize("shape,tile,overlap", [((2, 3, 40, 72), 16, 8), ((1, 3, 17, 90), 16, 15),
                                                ((1, 3, 8, 300), 32, 8)])
def test_pointwise_function_tiles_exactly(shape, tile, overlap):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(4, shape[1], 1, 1, generator=g)
    fn = lambda t: torch.nn.functional.conv2d(t, w)  # noqa: E731  (no spatial context: blending must be exact)
    seen = []
    out = tiled_apply(fn, x, tile, overlap, tiles_per_call=3, on_tile=lambda done, total: seen.append((done, total)))
    assert_close_to_scale(out, fn(x))
    assert seen[-1][0] == seen[-1][1] > 1


def test_small_latents_take_one_call():
    calls = []
    tiled_apply(lambda t: calls.append(t.shape) or t, torch.zeros(1, 4, 8, 8), 96, 32)
    assert calls == [(1, 4, 8, 8)]


def test_norm_synced_tiling_is_exact_for_a_conv_groupnorm_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(8, 3, 3, padding=1)).double()
    x = torch.randn(2, 3, 37, 50, dtype=torch.float64)
    norms = [m for m in net if isinstance(m, torch.nn.GroupNorm)]
    seen = []
    from swiftstep.core.tiling import tiled_norm_synced

    out = tiled_norm_synced(net, norms, x, tile=16, halo=4, scale=2,
                            on_tile=lambda done, total: seen.append((done, total)))
    torch.testing.assert_close(out, net(x), rtol=1e-9, atol=1e-9)  # global statistics: no tone seams
    assert seen[-1] == (12, 12)
    assert all("forward" not in n.__dict__ for n in norms)  # the network is left as it was
    # per-tile statistics (what plain tiling does) would differ visibly:
    plain = torch.cat([torch.cat([net(x[:, :, y:y + 16, c:c + 16]) for c in range(0, 50, 16)], 3)
                       for y in range(0, 37, 16)], 2)
    assert (plain - net(x)).abs().max() > 1e-2
