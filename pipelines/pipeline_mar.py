"""`MARPipeline`: class-conditional ImageNet generation with MAR and DiSA step annealing.

The sampler is `core.disa.sample_tokens` (checked bit-identical to LTH14/mar's on random weights); the head's step
count per iteration follows `step_schedule` (DiSA: many steps early, few late). `official_compat=True` reproduces
DiSA's released code, which clips every respaced head timestep at 950 and draws generation orders from numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..core import disa, finite, imagenet
from ..core.head_graph import GraphedHead
from ..models.mar import MAR, SIZES
from .mar_checkpoint import KL16_CONFIG, KL16_SCALE, convert_kl16, read_checkpoint

DEFAULT_CFG = {12: 2.9, 16: 3.0, 20: 3.3}  # DiSA README, MAR-B / L / H with 64 iterations


class MARPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "mar->vae"

    def __init__(self, mar: MAR, vae: AutoencoderKL):
        super().__init__()
        self.register_modules(mar=mar, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=16)

    @classmethod
    def from_official(cls, mar_ckpt: str | Path, vae_ckpt: str | Path, size: str = "base") -> "MARPipeline":
        """The official `checkpoint-last.pth` (its `model_ema` weights) and `kl16.ckpt` (read with weights_only)."""
        if size not in SIZES:
            raise ValueError(f"`size` must be one of {tuple(SIZES)}, got {size!r}.")
        model = MAR.from_size(size)
        state = read_checkpoint(mar_ckpt, "model_ema", "MAR")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            width = state.get("fake_latent", torch.empty(0, 0)).shape[-1]
            found = next((n for n, s in SIZES.items() if s["width"] == width), f"width {width}")
            raise ValueError(f"{Path(mar_ckpt).name} does not fit MAR-{size} (it looks like MAR-{found}): {e}") from e
        vae = AutoencoderKL(**KL16_CONFIG)
        vae.load_state_dict(convert_kl16(read_checkpoint(vae_ckpt, "model", "KL-16 VAE")), strict=True)
        return cls(mar=model.eval(), vae=vae.eval())

    @torch.no_grad()
    def __call__(self, class_labels, num_iter: int = 64, step_schedule: str = "disa-linear", steps_start: int = 50,
                 steps_end: int = 5, cfg: float | None = None, cfg_schedule: str = "linear",
                 temperature: float = 1.0, generator: torch.Generator | None = None, output_type: str = "pil",
                 official_compat: bool = False, head_graphs: bool | None = None, return_dict: bool = True,
                 callback_on_iteration=None):
        r"""Generate one image per class label.

        Args:
            class_labels: ImageNet classes, one image each: ids 0 … 999 or names ("golden retriever", case and
                '_' ignored; `swiftstep.core.imagenet.IMAGENET_CLASSES`), as one value, a list or a tensor of ids.
            num_iter: autoregressive iterations (DiSA/MAR: 64; MAR's paper evaluations: 256).
            step_schedule: "disa-linear" | "disa-cosine" | "disa-two-stage" | "constant" head steps per iteration,
                from `steps_start` to `steps_end` (MAR's own sampler: "constant" with steps_end=100).
            cfg: classifier-free guidance (default per size: 2.9 / 3.0 / 3.3); cfg_schedule "linear" | "constant".
            temperature: scales the head's sampling noise.
            generator: seeds the generation orders, then every Gaussian draw of the head, in the official order.
            official_compat: reproduce the official code for the same seed: generation orders drawn with numpy
                (as `np.random.seed(s)` before the official `sample_tokens`), noise from the generator's CPU stream,
                and DiSA's head timesteps clipped at 950 for the disa-* schedules (DiSA's released sampler); with
                "constant" no clip, i.e. LTH14/mar's own sampler (DiSA's clipped "constant" is a disa-* schedule
                with steps_start == steps_end). Checked on tiny random models: tokens bit-identical to LTH14/mar
                (constant) and to DiSA's MAR_DiSA (linear, cosine, two-stage) for the same seed.
                Off: torch orders and MAR's respacing throughout.
            head_graphs: run the diffusion head from CUDA graphs (`core.head_graph.GraphedHead`: static buffers,
                graphs of 1 … 64 steps replayed per step count, captured once per pipeline). Default: on CUDA.
                Same draws, same maths; on the GPU the result can differ from the eager head in the last bits
                (matrix sizes are padded to buckets). A capture that fails falls back to eager, logged once.
            callback_on_iteration: `fn(done, total)` after each iteration (progress; raise to stop).
        """
        # 1. Check inputs
        classes = self.mar.class_emb.num_embeddings
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if torch.is_tensor(class_labels):
            class_labels = class_labels.flatten().tolist()
        labels = torch.tensor([imagenet.class_id(c, classes) for c in class_labels], dtype=torch.long)
        if labels.numel() == 0:
            raise ValueError("`class_labels` is empty.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        seq_len = self.mar.seq_len
        if num_iter > seq_len:
            raise ValueError(f"`num_iter` ({num_iter}) cannot exceed the number of tokens ({seq_len}).")
        steps = disa.step_schedule(step_schedule, num_iter, steps_start, steps_end)
        if cfg is None:
            cfg = DEFAULT_CFG.get(self.mar.config.encoder_depth, 3.0)
        cfg, temperature = finite.check_finite("cfg", cfg), finite.check_finite("temperature", temperature)
        disa.cfg_scale(cfg, cfg_schedule, 0, 1)  # validates the schedule name
        device = self._execution_device
        bsz = labels.numel()

        # 2. Generation orders (first use of the seed), then the head's noise
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
        if official_compat:
            rng = np.random.RandomState(generator.initial_seed() % 2**32)
            orders = []
            for _ in range(bsz):
                order = np.arange(seq_len)
                rng.shuffle(order)
                orders.append(order)
            orders = torch.from_numpy(np.stack(orders)).long()
        else:
            orders = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(bsz)])

        clip = disa.OFFICIAL_CLIP if official_compat and step_schedule != "constant" else None

        def randn(shape):  # one float32 CPU stream, as the official code; consumers move the draws
            return torch.randn(shape, generator=generator)

        use_graphs = device.type == "cuda" if head_graphs is None else head_graphs
        if use_graphs and getattr(self, "_graphed_head", None) is None:
            self._graphed_head = GraphedHead()
        head = self._graphed_head if use_graphs else None

        # 3. Autoregressive sampling with DiSA-annealed head steps
        with self.progress_bar(total=num_iter) as progress:
            tokens = disa.sample_tokens(self.mar, bsz, labels.to(device), num_iter, cfg, cfg_schedule, temperature,
                                        steps, clip, randn, orders.to(device), head=head, on_iteration=lambda i, n: (
                                            progress.update(),
                                            callback_on_iteration and callback_on_iteration(i + 1, n)))
        latents = self.mar.unpatchify(tokens)

        # 4. Decode (KL-16: tokens / 0.2325)
        if output_type == "latent":
            images = latents
        else:
            image = self.vae.decode((latents / KL16_SCALE).to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
