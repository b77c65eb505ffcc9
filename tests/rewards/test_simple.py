import torch

from diffalign.rewards import get


def test_random_classifier_is_a_function_of_its_seed_and_of_the_pixels():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global generator does not matter
    first = get("random_classifier", seed=1)(images, [""] * 4)
    torch.manual_seed(456)
    again = get("random_classifier", seed=1)(images, [""] * 4)
    other = get("random_classifier", seed=2)(images, [""] * 4)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    assert first.std() > 0  # different images, different scores
    # larger images are resized to 32×32 first: a 2×-upsampled image scores close to the original
    upsampled = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    torch.testing.assert_close(get("random_classifier", seed=1)(upsampled, [""] * 4), first, atol=1e-2, rtol=0)
