"""ViT recipe: a few steps reduce the loss; the result is cached by config hash."""
import torch

from edge.models.vit import ViT, ViTConfig
from edge.recipes.vit_mnist import ViTRecipe, train


def test_vit_shapes_for_both_stems():
    x = torch.rand(3, 1, 28, 28)
    conv = ViT(ViTConfig(stem="conv"))
    patch = ViT(ViTConfig(stem="patch", patch_size=7))
    assert conv.config.num_tokens == 49 and patch.config.num_tokens == 16
    assert conv(x).shape == patch(x).shape == (3, 10)


def test_training_smoke_loss_decreases_and_is_cached(build_tmp):
    small = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    recipe = ViTRecipe(model=small, max_steps=80, batch_size=64, lr=3e-3, augment=False, fallback_data=True)
    r = train(recipe, quiet=True)
    assert not r.cached
    assert r.metrics["last_loss"] < 0.9 * r.metrics["first_loss"]
    assert (r.path / "model.safetensors").is_file()
    again = train(recipe, quiet=True)
    assert again.cached and again.path == r.path
