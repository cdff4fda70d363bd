"""Issue 29 items 1-3 on the FLUX side: aspect-ratio buckets and several sizes, held-out photos and their validation
loss, prior preservation's class images and loss; plus the loss chart's frame. Fast: a tiny FLUX from configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from app.plots import TRAINING, VALIDATION, loss_frame, read_validation
from pipelines.diffusion_common.buckets import buckets, check_resolution, latent_tokens, nearest_bucket, planned_side
from pipelines.flux.backend import FluxBackend, FluxSettings
from pipelines.runner import RunSettings
from pipelines.runner.data import resize_and_crop, resize_and_crop_to

from flux_fixtures import save_tiny_flux


# -- buckets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [64, 256, 512, 1024])
def test_buckets_have_sides_of_16_and_the_area_of_the_resolution(resolution):
    sizes = buckets(resolution)
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % 16 == 0 and height % 16 == 0
        assert 0.5 <= width / height <= 2.0
        # rounding one side to 16 pixels moves the area by at most 8 pixels of the other side
        assert abs(width * height - resolution ** 2) <= 8 * max(width, height) + 1e-9


def test_a_photo_goes_to_the_bucket_of_nearest_aspect_ratio():
    assert nearest_bucket(1000, 1000, 512) == (512, 512)
    landscape = nearest_bucket(4000, 3000, 512)
    portrait = nearest_bucket(3000, 4000, 512)
    assert landscape == portrait[::-1]  # log-ratio distance: 4:3 and 3:4 mirror each other
    assert abs(landscape[0] / landscape[1] - 4 / 3) < 0.05
    assert nearest_bucket(5000, 1000, 512)[0] / nearest_bucket(5000, 1000, 512)[1] <= 2.0  # clamped at 2:1


def test_the_planner_plans_the_bucket_with_the_most_tokens():
    sizes = [(512, 512), (592, 448), (368, 720)]
    side = planned_side(sizes)
    assert side % 16 == 0 and (side // 16) ** 2 >= max(latent_tokens(s) for s in sizes)
    assert (side // 16 - 1) ** 2 < max(latent_tokens(s) for s in sizes)  # the smallest square that holds it
    assert planned_side([(512, 512)]) == 512


@pytest.mark.parametrize("bad", [500, 8, 0, -16])
def test_a_resolution_not_a_multiple_of_16_is_refused_in_words(bad):
    with pytest.raises(ValueError, match="multiple of 16"):
        check_resolution(bad)


def test_resizing_to_a_bucket_keeps_the_shape_and_equals_the_square_crop_for_squares():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    assert resize_and_crop_to(image, 80, 64).size == (80, 64)
    assert np.array_equal(np.asarray(resize_and_crop(image, 64)), np.asarray(resize_and_crop_to(image, 64, 64)))


# -- a tiny FLUX with photos of three shapes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", guidance=False)


def _photos(folder, shapes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index, (w, h) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    return folder


SHAPES = [(96, 64), (64, 96), (64, 64), (96, 64), (64, 64)]


def _backend(model, tmp_path, batch_size=3, **settings):
    images = _photos(tmp_path / "photos", SHAPES)
    defaults = dict(images=str(images), prompt="a photo of sks dog", resolution=32, resolutions=[64],
                    max_sequence_length=16)
    backend = FluxBackend(RunSettings(model=str(model), batch_size=batch_size, seed=3),
                          FluxSettings(**{**defaults, **settings}), torch.device("cpu"))
    backend.validate()
    data = tmp_path / "run" / "data"
    backend.copy_data(data)
    backend.use_data(data)
    cache = tmp_path / "run" / "cache"
    cache.mkdir()
    backend.build_cache(cache)
    backend.load_cache(cache)
    return backend


class Zero(torch.nn.Module):
    """A 'transformer' that predicts zero velocity: each row's loss is then mean(w · (n - x0)²) exactly."""

    def forward(self, hidden_states, **kwargs):
        return (torch.zeros_like(hidden_states),)


class Scaled(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, hidden_states, **kwargs):
        return (self.scale * hidden_states,)


def test_batches_take_one_bucket_and_every_size_and_shape_is_trained(model, tmp_path):
    backend = _backend(model, tmp_path, holdout=1)
    latents = backend._latents()
    seen = set()
    for step in range(40):
        entries = backend._draw(torch.Generator().manual_seed(step), 3)
        sizes = {tuple(latents[k]["size"]) for k in entries}
        assert len(sizes) == 1, sizes  # one shape per forward
        seen |= sizes
    assert {(32, 32), (64, 64), (80, 48), (48, 80)} <= seen  # both sizes; wide, tall and square photos keep shape
    assert all(latents[k]["role"] == "train" for step in range(40)
               for k in backend._draw(torch.Generator().manual_seed(step), 3))
    wide = [e for e in latents if e["role"] == "train" and e["item"] == 0 and e["res"] == 1]
    assert wide[0]["mean"].shape[-2:] == (48 // 2, 80 // 2)  # the tiny VAE halves: a 96x64 photo kept its shape


def test_the_last_photos_are_held_out_and_never_drawn_for_training(model, tmp_path):
    backend = _backend(model, tmp_path, holdout=2)
    assert [p.name for p in backend.images] == ["p0.png", "p1.png", "p2.png"]
    assert [p.name for p, _ in backend.held_out] == ["p3.png", "p4.png"]
    roles = {e["role"] for e in backend._latents()}
    assert roles == {"train", "validation"}
    trained = {e["item"] for e in backend._latents() if e["role"] == "train"}
    assert trained == {0, 1, 2}


def test_validation_loss_is_the_same_number_twice_and_moves_with_the_model(model, tmp_path):
    backend = _backend(model, tmp_path, holdout=2)
    first, again = backend.validation_loss(Zero()), backend.validation_loss(Zero())
    assert first == again  # fixed noise and σ per held-out photo: two rounds differ only by the model
    assert backend.validation_scores(Scaled(0.5)) != {"validation_loss": first}
    # zero velocity: each row is mean((n - x0)²), with n ~ N(0, 1) and x0 the scaled latents: near 1 + E[x0²]
    assert 0.5 < first < 20
    assert math.isfinite(first)


def test_no_held_out_photos_means_no_validation_scores(model, tmp_path):
    backend = _backend(model, tmp_path)
    assert backend.validation_scores(Zero()) == {}


@pytest.mark.parametrize("settings, words", [
    ({"holdout": 5}, r"Held-out photos \(--holdout\) is 5 but there are 5 photos"),
    ({"class_prompt": "a photo of sks dog"}, "leave the trigger word out"),
    ({"class_images": "EMPTY", "class_prompt": "a dog"}, "holds no JPEG, PNG or WebP images"),
    ({"class_images": "EMPTY"}, "Class prompt is empty"),
    ({"resolutions": [100]}, r"More image sizes \(--train-resolution\): 100 is not a multiple of 16"),
    ({"resolution": 40}, r"Image size \(--resolution\) 40 is not a multiple of 16"),
])
def test_bad_data_settings_are_refused_in_the_words_of_the_screen(model, tmp_path, settings, words):
    (tmp_path / "empty").mkdir()
    settings = {k: str(tmp_path / "empty") if v == "EMPTY" else v for k, v in settings.items()}
    backend = FluxBackend(RunSettings(model=str(model)),
                          FluxSettings(images=str(_photos(tmp_path / "photos", SHAPES)), prompt="a photo of sks dog",
                                       **settings), torch.device("cpu"))
    with pytest.raises(ValueError, match=words):
        backend.validate()


def test_prior_loss_is_instance_loss_plus_weight_times_class_loss(model, tmp_path):
    classes = _photos(tmp_path / "classes", [(64, 64), (64, 64)])
    backend = _backend(model, tmp_path, batch_size=2, class_prompt="a photo of a dog", class_images=str(classes),
                       prior_weight=0.25, resolutions=[])
    assert backend.class_images_to_draw() == 0  # the user's own: nothing to draw
    assert sum(e["role"] == "class" for e in backend._latents()) == 2
    loss = backend.training_loss(Zero(), 0, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)  # the same draws, in the same order, by hand
    instance = backend._noised(backend._draw(generator, 2), generator)
    prior = backend._noised(backend._draw(generator, 2, role="class"), generator)
    assert {backend._latents()[k]["role"] for k in backend._draw(torch.Generator().manual_seed(11), 2,
                                                                   role="class")} == {"class"}
    by_hand = ((instance["noise"] - instance["x0"]) ** 2).mean() + 0.25 * ((prior["noise"] - prior["x0"]) ** 2).mean()
    assert torch.allclose(loss, by_hand, rtol=1e-5, atol=1e-6)
    assert backend.memory_rows()["batch_size"] == 4  # the planner counts the class rows beside the photos


def test_class_images_to_draw_default_to_the_training_photos(model, tmp_path):
    backend = _backend(model, tmp_path, holdout=1, class_prompt="a photo of a dog")
    assert backend.class_images_to_draw() == 4
    backend.settings.class_count = 7
    assert backend.class_images_to_draw() == 7


def test_drawn_class_images_are_written_once_and_read_back_as_class_rows(model, tmp_path):
    backend = _backend(model, tmp_path, class_prompt="a photo of a dog", class_count=2, preview_steps=1,
                       resolutions=[])
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(model), subfolder="transformer")
    folder = tmp_path / "class-images"
    folder.mkdir()
    paths = backend.write_class_images(folder, transformer)
    assert [p.name for p in paths] == ["class-000.png", "class-001.png"]
    assert Image.open(paths[0]).size == (32, 32)
    assert not backend._prior_on()
    backend.use_class_images(folder)
    assert backend._prior_on() and sum(e["role"] == "class" for e in backend._latents()) == 2
    assert json.loads((folder / "class.json").read_text())["prompt"] == "a photo of a dog"
    loss = backend.training_loss(Zero(), 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


# -- the loss chart -------------------------------------------------------------------------------------------
def test_the_loss_chart_draws_validation_beside_training(tmp_path):
    (tmp_path / "loss.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "validation_loss": 0.9}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.8},
        {"step": 2, "validation_loss": 0.7}]) + "\n{\"step\": 3, \"valid")  # a line being written
    validation = read_validation(tmp_path)
    assert validation == [(0, 0.9), (2, 0.7)]
    frame = loss_frame([(1, 1.0), (2, 0.8)], validation)
    assert list(frame["series"]) == [TRAINING, TRAINING, VALIDATION, VALIDATION]
    assert frame["step"].dtype == "int64" and frame["loss"].dtype == "float64"
    assert len(loss_frame([])) == 0 and read_validation("") == []


def test_a_validation_round_holds_less_memory_than_a_training_step(model, tmp_path):
    """The planner adds nothing for validation: its no-grad forwards of at most --batch-size rows stay under the
    training step's peak (forward + backward of the same rows, LoRA gradients). Counted storage by storage."""
    import emloc
    from diffusers import FluxTransformer2DModel
    from emloc.trace import MemoryCounter

    backend = _backend(model, tmp_path, batch_size=2, holdout=2, resolutions=[])
    transformer = FluxTransformer2DModel.from_pretrained(str(model), subfolder="transformer").requires_grad_(False)
    backend.enable_gradient_checkpointing(transformer)
    peft_model = emloc.attach_lora(transformer, backend.run.lora(backend.default_lora_targets()))
    peft_model.train()
    with MemoryCounter() as training:
        backend.training_loss(peft_model, 0, torch.Generator().manual_seed(0)).backward()
    peft_model.eval()
    with MemoryCounter() as validation, torch.no_grad():
        backend.validation_loss(peft_model)
    assert 0 < validation.peak["cpu"] <= training.peak["cpu"], (validation.peak, training.peak)


def test_the_data_steps_settings_are_read_as_the_backend_reads_them(tmp_path):
    from app import form

    photo = _photos(tmp_path / "drop", [(64, 64)]) / "p0.png"
    values = {"holdout": 2.0, "resolutions": "512, 768", "class_prompt": " a photo of a dog ", "class_count": 3,
              "prior_weight": 0.5, "class_images": [str(photo)]}
    read = form.data_settings("flux", values, tmp_path / "staging")
    assert read == {"holdout": 2, "resolutions": [512, 768], "class_prompt": "a photo of a dog", "class_count": 3,
                    "prior_weight": 0.5, "class_images": str(tmp_path / "staging" / form.CLASS_UPLOADS)}
    assert (tmp_path / "staging" / form.CLASS_UPLOADS / "p0.png").is_file()
    assert form.data_settings("vlm", values) == {"holdout": 2}  # InternVL has no sizes or class images
    with pytest.raises(ValueError, match=r"More image sizes \(step 2\) must be whole numbers"):
        form.data_settings("flux", {"resolutions": "512px"})
    with pytest.raises(ValueError, match=r"Held-out photos \(step 2\) must be a whole number"):
        form.data_settings("flux", {"holdout": 1.5})
