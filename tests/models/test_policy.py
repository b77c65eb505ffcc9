import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffalign.models import add_lora, guided_model_output, load_policy, resolve_model, save_lora
from diffalign.models.tiny import save_tiny_pipeline


def test_guidance_is_the_cfg_combination(tiny_policy):
    unet = tiny_policy.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500, 20])
    cond = tiny_policy.encode_prompts(["a cat", "a dog"])
    uncond = tiny_policy.encode_prompts(["", ""])
    with torch.no_grad():
        guided = guided_model_output(unet, x, t, cond, uncond, 7.5)
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond).sample
        single = guided_model_output(unet, x, t, cond, uncond, 1.0)
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single, eps_c, rtol=1e-5, atol=1e-6)


def test_shapes_and_decode_range(tiny_policy):
    assert tiny_policy.latent_shape == (4, 16, 16)
    assert tiny_policy.image_size == (32, 32)
    with torch.no_grad():
        images = tiny_policy.decode(torch.randn(2, 4, 16, 16))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_loads_from_a_local_folder_offline(tmp_path, tiny_policy):
    save_tiny_pipeline(tmp_path / "pipe")
    loaded = load_policy(str(tmp_path / "pipe"))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    emb = loaded.encode_prompts(["a cat"])
    torch.testing.assert_close(emb, tiny_policy.encode_prompts(["a cat"]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model_output(x, t, emb), tiny_policy.model_output(x, t, emb))
    assert torch.equal(loaded.schedule.alphas_cumprod, tiny_policy.schedule.alphas_cumprod)
    assert loaded.schedule.timesteps(50)[0].item() == 981


def test_resolve_model_errors(tmp_path):
    assert resolve_model("tiny") == "tiny"
    assert resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5").startswith("stable-diffusion")
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match="no unet/"):
        resolve_model(str(tmp_path))


def test_lora_starts_as_identity_and_exports_to_plain_diffusers(tmp_path):
    policy = load_policy("tiny")
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([700, 100])
    emb = policy.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        before = policy.model_output(x, t, emb)
    add_lora(policy.unet, rank=4, alpha=8.0)
    trainable = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(policy.model_output(x, t, emb), before)  # B = 0 at init
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        adapted = policy.model_output(x, t, emb)
    assert (adapted - before).abs().max() > 1e-3

    save_lora(policy.unet, tmp_path / "lora")
    save_tiny_pipeline(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-5)


def test_lora_rank_validation(tiny_policy):
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_policy.unet, rank=0, alpha=1.0)
