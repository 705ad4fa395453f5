"""MAR's diffusion head loop with static buffers, replayed from CUDA graphs on CUDA.

The head is a small MLP run for T steps per AR iteration; on a GPU each step is ~20 tiny kernels and the loop is
launch-bound (3–7 ms per step on an H100 regardless of the batch). `GraphedHead` keeps everything a step reads in
static device buffers — latents x, conditions z, the diffusion's coefficient tables, every noise draw, CFG scale,
temperature and the step index itself — so one step is a fixed sequence of kernels. It captures graphs of K = 1, 2,
4 … 64 consecutive steps per row bucket and runs T steps as the binary decomposition of T (≤ 7 launches for T ≤ 127).

* Rows are padded to a power-of-two bucket (per CFG half, so the [cond; uncond] split stays aligned); the head is
  row-wise, so padding never changes a real row.
* Noise comes from the caller's `randn` in the official order (start noise, then one draw per step, the last one
  ignored) and is copied to the device in one transfer per call, so seeds give the same images as `head_sample`.
* The step index lives on the device and is decremented inside the graph; the coefficient tables are gathered with
  it, so one graph serves every step count.
* Without CUDA (or with `capture=False`) the same step code runs eagerly: that is what the CPU tests compare with
  `core.disa.head_sample`. A capture that fails falls back to eager, logged once.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from . import cuda_graphs

logger = logging.getLogger("swiftstep")

_KS = (64, 32, 16, 8, 4, 2, 1)
_TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
           "posterior_mean_coef2", "log_betas", "posterior_log_variance_clipped")


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def _capacity(steps: int) -> int:
    return max(64, 1 << (steps - 1).bit_length())


class _Buffers:
    """Static tensors for one (row bucket, CFG or not); graphs reference their addresses."""

    def __init__(self, bucket: int, cfg: bool, steps_cap: int, channels: int, z_dim: int, device, dtype):
        rows = 2 * bucket if cfg else bucket
        self.bucket, self.cfg, self.cap, self.rows = bucket, cfg, steps_cap, rows
        self.x = torch.zeros(rows, channels, device=device, dtype=dtype)
        self.z = torch.zeros(rows, z_dim, device=device, dtype=dtype)
        self.noise = torch.zeros(steps_cap, rows, channels, device=device, dtype=dtype)
        self.tables = torch.zeros(len(_TABLES), steps_cap, 1, device=device, dtype=torch.float32)
        self.has_noise = torch.zeros(steps_cap, 1, device=device, dtype=torch.float32)
        self.timesteps = torch.zeros(steps_cap, device=device, dtype=torch.long)
        self.index = torch.zeros(1, device=device, dtype=torch.long)
        self.cfg_scale = torch.ones(1, device=device, dtype=torch.float32)
        self.temperature = torch.ones(1, device=device, dtype=torch.float32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}


_REGION = "the MAR head's step loop"  # how CaptureAudit names it


class GraphedHead:
    """Drop-in for `core.disa.head_sample` (same arguments, same draws) that reuses static buffers and CUDA graphs.

    One instance per model; `sample_tokens(..., head=GraphedHead(...))`. `capture=None` captures on CUDA only."""

    def __init__(self, capture: bool | None = None, audit: bool = False):
        self.capture = capture
        self.audit = audit  # eager runs under `cuda_graphs.CaptureAudit` (tests); captures always audit the warm-up
        self._buffers: dict = {}
        self._pool = None
        self._warned = False
        self.replays = 0  # graph launches so far (for tests and benchmarks)

    def __call__(self, net, z: torch.Tensor, diffusion, temperature: float, cfg: float, randn) -> torch.Tensor:
        use_cfg = cfg != 1.0
        n = z.shape[0] // 2 if use_cfg else z.shape[0]
        steps, channels = len(diffusion), net.in_channels
        buf = self._buffers_for(net, n, use_cfg, steps, z)

        # every Gaussian draw, in the official order, in one transfer
        start = randn((n, channels)).cpu()
        draws = torch.stack([randn((2 * n if use_cfg else n, channels)).cpu() for _ in range(steps)])
        noise = torch.zeros(steps, buf.rows, channels, dtype=buf.noise.dtype)
        x0 = torch.zeros(buf.rows, channels, dtype=buf.x.dtype)
        noise[:, :n] = draws[:, :n].flip(0)  # noise[i] is the draw of the step at respaced index i
        x0[:n] = start
        if use_cfg:
            b = buf.bucket
            noise[:, b:b + n] = draws[:, n:].flip(0)
            x0[b:b + n] = start
        zpad = torch.zeros(buf.rows, z.shape[1], dtype=buf.z.dtype, device=z.device)
        zpad[:n] = z[:n]
        if use_cfg:
            zpad[buf.bucket:buf.bucket + n] = z[n:]

        buf.noise[:steps].copy_(noise, non_blocking=True)
        buf.x.copy_(x0, non_blocking=True)
        buf.z.copy_(zpad)
        buf.tables[:, :steps].copy_(self._tables(diffusion, buf.tables.device))
        buf.has_noise[:steps].fill_(1.0)
        buf.has_noise[0].fill_(0.0)  # the last step adds no noise (its draw is consumed all the same)
        buf.timesteps[:steps].copy_(torch.tensor(diffusion.timestep_map, dtype=torch.long))
        buf.cfg_scale.fill_(cfg)
        buf.temperature.fill_(temperature)
        buf.index.fill_(steps - 1)
        self._run(net, buf, steps)
        out = buf.x[:n]
        return torch.cat([out, buf.x[buf.bucket:buf.bucket + n]]) if use_cfg else out.clone()

    # ------------------------------------------------------------------ internals
    def _buffers_for(self, net, n, use_cfg, steps, z) -> _Buffers:
        signature = tuple(p.data_ptr() for p in net.parameters())
        if signature != getattr(self, "_signature", None):  # the head moved (.to(), offload): graphs are stale
            self._buffers.clear()
            self._signature = signature
        key = (_bucket(n), use_cfg)
        buf = self._buffers.get(key)
        if buf is None or buf.cap < steps or buf.x.device != z.device or buf.x.dtype != z.dtype:
            buf = _Buffers(key[0], use_cfg, _capacity(steps), net.in_channels, z.shape[1], z.device, z.dtype)
            self._buffers[key] = buf  # graphs of a replaced buffer set go with it
        return buf

    @staticmethod
    def _tables(diffusion, device) -> torch.Tensor:
        cache = diffusion.__dict__.setdefault("_graph_tables", {})
        if device not in cache:
            rows = [torch.tensor(getattr(diffusion, name), dtype=torch.float32) for name in _TABLES]
            cache[device] = torch.stack(rows).unsqueeze(-1).to(device)
        return cache[device]

    @staticmethod
    def _step(net, buf: _Buffers) -> None:
        """One reverse step at the device-side index (`HeadDiffusion.p_sample` with every operand a buffer)."""
        i = buf.index
        t = buf.timesteps.index_select(0, i).expand(buf.rows)
        if buf.cfg:
            out = net.forward_with_cfg(buf.x, t, buf.z, buf.cfg_scale)
        else:
            out = net(buf.x, t, buf.z)
        eps, v = out.chunk(2, dim=-1)
        c = buf.tables.index_select(1, i)  # [6, 1, 1]
        x0 = c[0] * buf.x - c[1] * eps
        mean = c[2] * x0 + c[3] * buf.x
        frac = (v + 1) / 2
        log_var = frac * c[4] + (1 - frac) * c[5]
        noise = buf.noise.index_select(0, i)[0]
        buf.x.copy_(mean + torch.exp(0.5 * log_var) * noise * buf.temperature * buf.has_noise.index_select(0, i))
        buf.index.sub_(1)

    def _steps(self, net, buf: _Buffers, count: int) -> None:
        for _ in range(count):
            self._step(net, buf)

    def _run(self, net, buf: _Buffers, steps: int) -> None:
        if not self._captures(buf):
            with cuda_graphs.CaptureAudit(_REGION) if self.audit else contextlib.nullcontext():
                self._steps(net, buf, steps)
            return
        remaining = steps
        for k in _KS:
            while remaining >= k:
                graph = buf.graphs.get(k) or self._capture(net, buf, k)
                if graph is None:  # capture failed: eager from here on
                    self._steps(net, buf, remaining)
                    return
                graph.replay()
                self.replays += 1
                remaining -= k

    def _captures(self, buf: _Buffers) -> bool:
        return buf.x.is_cuda and self.capture is not False

    def _capture(self, net, buf: _Buffers, k: int):
        """Capture k steps. Warm-up runs mutate x and the index, so both are saved and restored around it."""
        saved_x, saved_i = buf.x.clone(), buf.index.clone()
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()

            graph, _ = cuda_graphs.capture(lambda: self._steps(net, buf, k), self._pool, audit=_REGION,
                                           prepare=lambda: buf.index.fill_(k - 1))  # the reset stays out of the graph
        except Exception as e:  # noqa: BLE001 — any capture failure: eager is always correct
            if not self._warned:
                logger.warning("swiftstep: CUDA-graph capture of the MAR head failed (%s); running it eagerly.", e)
                self._warned = True
            self.capture = False
            graph = None
        buf.x.copy_(saved_x)
        buf.index.copy_(saved_i)
        if graph is not None:
            buf.graphs[k] = graph
        return graph
