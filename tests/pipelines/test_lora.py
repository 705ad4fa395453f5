"""LoRA files (diffusers/peft and kohya) change the model exactly as their definition says, or fail loudly."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from swiftstep.pipelines import OneStepPipeline

from ..fixtures import gen

PROMPT = "a studio photo of a ceramic teapot"


def _load(models, family):
    pipe = OneStepPipeline.from_pretrained(models[family]["folder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, unet=None, text_encoder=None):
    c = dict(pipe.components)
    c["unet"] = unet or c["unet"]
    c["text_encoder"] = text_encoder or c["text_encoder"]
    p = OneStepPipeline(**c)
    p.set_progress_bar_config(disable=True)
    return p(PROMPT, timesteps=[999], generator=gen(), output_type="latent").images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_lora_file_matches_peft_merge(models, tmp_path, family):
    """A LoRA trained with peft and saved with diffusers' `save_lora_weights` (alpha in its metadata)."""
    pipe = _load(models, family)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)  # random B, so the adapter changes the output
    torch.manual_seed(0)
    trained = copy.deepcopy(pipe.unet)
    trained.add_adapter(config)
    state = get_peft_model_state_dict(trained)
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())

    for module in trained.modules():  # peft's own merge: W ← W + (α/r)·B·A
        if isinstance(module, LoraLayer):
            module.merge()
    expected = _run(pipe, unet=trained)

    base = _run(pipe)
    pipe.load_lora_weights(tmp_path / "pytorch_lora_weights.safetensors")
    got = pipe(PROMPT, timesteps=[999], generator=gen(), output_type="latent").images
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the LoRA really did something


def _kohya_name(prefix, module_path):
    return f"{prefix}_{module_path.replace('.', '_')}"


def test_kohya_lora_with_alpha_matches_its_definition(models, tmp_path):
    """kohya-ss format: `lora_unet_…`/`lora_te_…` keys, `lora_down`/`lora_up`, per-module `alpha`; ΔW = (α/r)·up·down."""
    pipe = _load(models, "sd1")
    g = torch.Generator().manual_seed(0)
    rank, alpha = 4, 2.0  # scale 0.5: a loader that ignores alpha would double the effect
    targets = {
        "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
                 "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"],
        # kohya trains every text-encoder linear; diffusers' converter recognises the layout by `out_proj`
        "te": [f"encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")] + ["encoder.layers.1.mlp.fc1"],
    }
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    sd = {}
    for kind, model in (("unet", unet), ("te", te)):
        for path in targets[kind]:
            layer = model.get_submodule(path)
            down = torch.randn(rank, layer.in_features, generator=g) * 0.3
            up = torch.randn(layer.out_features, rank, generator=g) * 0.3
            name = _kohya_name(f"lora_{kind}", path if kind == "unet" else "text_model." + path)
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"] = torch.tensor(alpha)
            with torch.no_grad():
                layer.weight += (alpha / rank) * up @ down
    path = tmp_path / "my_style_kohya.safetensors"
    save_file(sd, str(path))

    expected = _run(pipe, unet=unet, text_encoder=te)
    pipe.load_lora_weights(path)
    got = pipe(PROMPT, timesteps=[999], generator=gen(), output_type="latent").images
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_lora_whose_keys_match_nothing_is_an_error(models, tmp_path):
    pipe = _load(models, "sd1")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q"  # no attn9 in any UNet
    sd = {f"{name}.lora_down.weight": torch.zeros(4, 8), f"{name}.lora_up.weight": torch.zeros(8, 4)}
    path = tmp_path / "other_model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"other_model.safetensors: .*match"):
        pipe.load_lora_weights(path)


@pytest.mark.parametrize("name,state,match", [
    ("sdxl_lora.safetensors",
     {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 48),
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(48, 4)},
     r"sdxl_lora.safetensors: has 1 LoRA layers for `text_encoder_2`"),
    ("not_a_lora.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(2)}, "not_a_lora.safetensors"),
])
def test_lora_for_another_model_is_an_error(models, tmp_path, name, state, match):
    pipe = _load(models, "sd1")
    save_file(state, str(tmp_path / name))
    with pytest.raises(ValueError, match=match):
        pipe.load_lora_weights(tmp_path / name)


def test_truncated_lora_file_names_the_file_and_what_was_expected(models, tmp_path):
    pipe = _load(models, "sd1")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 8), f"{name}.lora_up.weight": torch.zeros(8, 4)},
              str(tmp_path / "full.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cut.safetensors: expected a LoRA .* safetensors parser found: .*"):
        pipe.load_lora_weights(tmp_path / "cut.safetensors")
