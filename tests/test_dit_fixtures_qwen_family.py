"""The tiny Z-Image-Turbo, FLUX.2-klein and Qwen-Image fixtures run in the stock diffusers pipelines, survive
save_pretrained/from_pretrained unchanged, and listen to the prompt: later tests compare against them."""

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, QwenImagePipeline, ZImagePipeline

from .dit_fixtures.qwen_family import (FLUX2_KLEIN_SCHEDULER, QWEN3_CHAT_TEMPLATE, QWENIMAGE_SCHEDULER,
                                       ZIMAGE_TURBO_SCHEDULER, build_flux2_klein, build_qwenimage, build_zimage,
                                       qwen_tokenizer)

SIZE = 32  # px: the smallest multiple of 16 (VAE 8x, then 2x2 patches) that still gives a 2x2 token grid
PROMPTS = ("a red cube on a wooden table", "a blue sphere floating in the sky")
# cfg off: Z-Image-Turbo runs unguided; klein is distilled; Qwen-Image's true cfg needs a negative prompt
CASES = {"zimage": (build_zimage, ZImagePipeline, {"guidance_scale": 0.0}, ZIMAGE_TURBO_SCHEDULER),
         "flux2_klein": (build_flux2_klein, Flux2KleinPipeline, {}, FLUX2_KLEIN_SCHEDULER),
         "qwenimage": (build_qwenimage, QwenImagePipeline, {"true_cfg_scale": 1.0}, QWENIMAGE_SCHEDULER)}


def _generate(pipe, prompt: str, call_kwargs: dict) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **call_kwargs).images


@pytest.mark.parametrize("name", list(CASES))
def test_stock_pipeline_runs_and_roundtrips(name, tmp_path):
    build, cls, call_kwargs, scheduler_config = CASES[name]
    pipe = build()
    image = _generate(pipe, PROMPTS[0], call_kwargs)
    assert image.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(image).all() and image.std() > 1e-3

    pipe.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path)
    for key, module in pipe.components.items():
        assert type(reloaded.components[key]) is type(module), key
    assert {k: reloaded.scheduler.config[k] for k in scheduler_config} == scheduler_config
    np.testing.assert_allclose(_generate(reloaded, PROMPTS[0], call_kwargs), image, rtol=0, atol=1e-6)

    other = _generate(pipe, PROMPTS[1], call_kwargs)
    assert np.abs(other - image).max() > 1e-4


def test_klein_is_distilled_in_model_index(tmp_path):
    build_flux2_klein().save_pretrained(tmp_path)
    assert '"is_distilled": true' in (tmp_path / "model_index.json").read_text()
    assert Flux2KleinPipeline.from_pretrained(tmp_path).config.is_distilled is True


@pytest.mark.parametrize("build", [build_zimage, build_flux2_klein, build_qwenimage])
def test_builds_are_seeded(build):
    first, second = build(seed=3).components, build(seed=3).components
    for key in ("transformer", "text_encoder", "vae"):
        a, b = first[key].state_dict(), second[key].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), key
    assert not torch.equal(next(iter(build(seed=4).transformer.parameters())),
                           next(iter(first["transformer"].parameters())))


def test_tokenizer_template_and_ids():
    tokenizer = qwen_tokenizer()
    assert tokenizer(PROMPTS[0]).input_ids != tokenizer(PROMPTS[1]).input_ids
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"

    # QwenImagePipeline drops this many leading tokens: its system part must be exactly that long
    pipe = build_qwenimage()
    system_part = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(system_part).input_ids) == pipe.prompt_template_encode_start_idx

    messages = [{"role": "user", "content": "hi"}]
    render = lambda **kw: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    assert render(enable_thinking=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render(enable_thinking=False) == render(enable_thinking=True) + "<think>\n\n</think>\n\n"
    assert tokenizer.chat_template == QWEN3_CHAT_TEMPLATE
