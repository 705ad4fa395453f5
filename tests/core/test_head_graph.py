"""GraphedHead: the head loop from static buffers (and CUDA graphs) equals `disa.head_sample` draw for draw."""

import pytest
import torch

from swiftstep.core import disa
from swiftstep.core.cuda_graphs import CaptureHazard
from swiftstep.core.head_graph import GraphedHead
from swiftstep.models.mar import SimpleMLPAdaLN

from ..tolerance import assert_close_to_scale


def head_net(seed=0):
    torch.manual_seed(seed)
    net = SimpleMLPAdaLN(in_channels=4, model_channels=32, out_channels=8, z_channels=12, num_res_blocks=2).eval()
    with torch.no_grad():  # the official init zeroes the output layers; random values make the check meaningful
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def draws(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g)


class FakeGraph:
    def __init__(self, run):
        self.run = run

    def replay(self):
        self.run()


class CPUGraphs(GraphedHead):
    """The capture/replay bookkeeping on CPU: a 'graph' of k steps replays them eagerly from the same buffers."""

    def _captures(self, buf):
        return True

    def _capture(self, net, buf, k):
        buf.graphs[k] = FakeGraph(lambda: self._steps(net, buf, k))
        return buf.graphs[k]


@pytest.mark.parametrize("runner", [GraphedHead(capture=False, audit=True), CPUGraphs()],
                         ids=["static-audited", "graph-replays"])
def test_matches_head_sample_for_every_step_count_and_row_count(runner):
    net = head_net()
    calls = [(3, 1.0, 5), (5, 2.5, 1), (13, 2.5, 37), (9, 1.0, 100), (17, 3.0, 22), (3, 2.5, 5)]
    with torch.no_grad():
        for n, cfg, steps in calls:  # consecutive calls reuse (and grow) the buffers
            rows = 2 * n if cfg != 1.0 else n
            z = torch.randn(rows, 12)
            diffusion = disa.HeadDiffusion(steps, clip=950 if steps == 37 else None)
            ref = disa.head_sample(net, z, diffusion, 0.9, cfg, draws(steps))
            got = runner(net, z, diffusion, 0.9, cfg, draws(steps))
            assert got.shape == ref.shape == (rows, 4)
            assert_close_to_scale(got, ref)
    if isinstance(runner, CPUGraphs):
        # 100 steps = 64 + 32 + 4; one 'graph' per k per bucket, reused
        assert runner.replays == sum(bin(len(disa.HeadDiffusion(s, clip=950 if s == 37 else None))).count("1")
                                     for _, _, s in calls)


def test_the_step_loop_is_audited_for_capture_hazards():
    """What a CUDA capture would refuse or freeze (here a host sync) is named before any capture."""
    net = head_net()
    forward = net.forward
    net.forward = lambda x, t, c: forward(x, t, c) * (1 + 0 * float(x.sum()))  # a hidden .item()
    with torch.no_grad(), pytest.raises(CaptureHazard, match="MAR head's step loop.*_local_scalar_dense"):
        GraphedHead(capture=False, audit=True)(net, torch.randn(3, 12), disa.HeadDiffusion(4), 1.0, 1.0, draws(0))


def test_the_last_step_adds_no_noise_and_every_draw_is_consumed():
    net = head_net(1)
    z = torch.randn(3, 12)
    diffusion = disa.HeadDiffusion(4)
    outs = []
    for last in (0.0, 1e6):
        consumed = []

        def randn(shape):
            consumed.append(shape)
            return torch.full(shape, last) if len(consumed) == 5 else torch.full(shape, 0.5)

        with torch.no_grad():
            outs.append(GraphedHead(capture=False)(net, z, diffusion, 1.0, 1.0, randn))
        assert consumed == [(3, 4)] * 5
    assert torch.equal(outs[0], outs[1]) and outs[0].isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_the_eager_head():
    net = head_net().cuda()
    runner = GraphedHead()
    with torch.no_grad():
        for n, cfg, steps in [(5, 2.5, 50), (300, 2.5, 7), (5, 1.0, 100), (6, 2.5, 50)]:
            z = torch.randn(2 * n if cfg != 1.0 else n, 12, device="cuda")
            diffusion = disa.HeadDiffusion(steps, clip=950)
            ref = disa.head_sample(net, z, diffusion, 1.0, cfg, draws(steps))
            got = runner(net, z, diffusion, 1.0, cfg, draws(steps))
            assert_close_to_scale(got, ref, rel=1e-4)
    assert runner.capture is not False and runner.replays > 0  # captured, not the eager fallback


def test_buffers_and_graphs_are_rebuilt_when_the_head_moves():
    net = head_net()
    runner = CPUGraphs()
    z = torch.randn(6, 12)
    with torch.no_grad():
        runner(net, z, disa.HeadDiffusion(5), 1.0, 2.0, draws(0))
        before = dict(runner._buffers)
        for p in net.parameters():  # what .to(device) and back does: new storage
            p.data = p.data.clone()
        got = runner(net, z, disa.HeadDiffusion(5), 1.0, 2.0, draws(0))
        ref = disa.head_sample(net, z, disa.HeadDiffusion(5), 1.0, 2.0, draws(0))
    assert_close_to_scale(got, ref)
    assert all(runner._buffers[k] is not before[k] for k in before)
