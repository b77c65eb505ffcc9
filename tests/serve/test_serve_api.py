"""The serving API on the tiny model (FastAPI's TestClient, real worker thread): images, seeds, rewards, previews,
bad input and the token."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

TOKEN = "s3cret-token"
BODY = {"prompt": "a red circle", "model": "base", "steps": 4, "seed": 7}


@pytest.fixture(scope="module")
def client(make_app):
    with TestClient(make_app()) as test_client:
        yield test_client


def generate(client, **changes) -> dict:
    response = client.post("/generate", json={**BODY, **changes})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_models_describe_what_is_served(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["base", "aligned", "shapes"]
    assert health["queued"] == 0 and health["running"] == 0
    listing = client.get("/models").json()
    base, aligned, shapes = listing["models"]
    assert (base["base"], base["lora"], base["image_size"]) == ("tiny", None, [32, 32])
    assert aligned["base"] == "tiny" and aligned["lora"].endswith("lora") and not aligned["shapes_world"]
    assert shapes["shapes_world"] and shapes["lora"] is None
    assert {r["name"]: (r["differentiable"], r["verifiable"]) for r in listing["rewards"]} == {
        "shapes": (False, True), "jpeg_compressibility": (False, False), "brightness": (True, False)}
    assert listing["steering"] == ["best-of-n", "fk", "svdd", "guidance"]
    assert listing["limits"]["steps"] == [1, 400]


def test_same_request_gives_the_same_png_and_other_seeds_or_models_differ(client, png_pixels):
    first, again = generate(client), generate(client)
    assert first["images"][0]["png"] == again["images"][0]["png"]  # identical PNG bytes
    pixels = png_pixels(first["images"][0]["png"])
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    other_seed = png_pixels(generate(client, seed=8)["images"][0]["png"])
    aligned = png_pixels(generate(client, model="aligned")["images"][0]["png"])
    assert np.abs(other_seed.astype(int) - pixels).mean() > 5
    assert np.abs(aligned.astype(int) - pixels).mean() > 5  # the LoRA changes the image on the same seed
    assert first["seed"] == 7 and first["model"] == "base" and first["denoiser_passes"] == 4 * 2  # guided: 2 rows


def test_num_images_gives_the_seeded_image_first(client):
    two = generate(client, num_images=2)
    assert len(two["images"]) == 2 and two["images"][0]["png"] == generate(client)["images"][0]["png"]
    assert two["images"][0]["png"] != two["images"][1]["png"]


def test_the_reward_is_the_reward_of_the_returned_image(client, png_pixels):
    result = generate(client, reward="brightness")
    image = result["images"][0]
    # brightness is the mean of the float image; the PNG rounds each pixel by at most 0.5/255
    assert image["reward"] == pytest.approx(png_pixels(image["png"]).mean() / 255, abs=0.5 / 255)
    assert image["strict"] is None and image["constraints"] is None and result["reward_calls"] == 1


def test_the_shapes_reward_lists_each_constraint_and_scores_their_fraction(client):
    for model, prompt in [("base", "a red circle left of a blue square"), ("shapes", "two green triangles")]:
        image = generate(client, model=model, prompt=prompt, reward="shapes", steps=6)["images"][0]
        checks = image["constraints"]
        names = [c["constraint"] for c in checks]
        assert names[0].startswith("present: ") and names[-1].startswith("exact: ")
        met = sum(c["ok"] for c in checks)
        assert image["reward"] == pytest.approx(met / len(checks)) and image["strict"] == (met == len(checks))


def test_steered_generation_spends_its_particles_and_repeats(client):
    steered = generate(client, reward="brightness", steps=3, steer="best-of-n", particles=3)
    assert steered["steer"] == "best-of-n" and steered["particles"] == 3
    # best-of-3: three guided trajectories of 3 steps (2 denoiser rows per step), 3 particles scored + the result
    assert steered["denoiser_passes"] == 3 * 3 * 2 and steered["reward_calls"] == 3 + 1
    again = generate(client, reward="brightness", steps=3, steer="best-of-n", particles=3)
    assert again["images"] == steered["images"]


@pytest.mark.parametrize("method", ["best-of-n", "fk", "svdd", "guidance"])
def test_every_served_steering_method_answers(client, method):
    result = generate(client, reward="brightness", steps=2, steer=method, particles=2)
    assert len(result["images"]) == 1 and 0 <= result["images"][0]["reward"] <= 1
    assert result["denoiser_passes"] > 2 * 2  # more than one plain guided trajectory of 2 steps


def test_the_stream_sends_x0_previews_then_the_same_result(client, png_pixels):
    with client.stream("POST", "/generate/stream", json={**BODY, "steps": 6, "preview_every": 2}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in text.strip().split("\n\n")]
    assert [kind for kind, _ in events] == ["started", "preview", "preview", "result"]
    assert [data["step"] for kind, data in events if kind == "preview"] == [2, 4]
    assert all(png_pixels(data["images"][0]).shape == (32, 32, 3) for kind, data in events if kind == "preview")
    result = events[-1][1]
    assert result["images"][0]["png"] == generate(client, steps=6)["images"][0]["png"]
    assert events[2][1]["images"][0] != result["images"][0]["png"]  # x̂0 at step 4 is not yet x_0


BAD_BODIES = [
    ({"prompt": ""}, 422, "prompt is empty"),
    ({"prompt": "   "}, 422, "prompt is empty"),
    ({"prompt": "a" * 301}, 422, "prompt has 301 characters; at most 300"),
    ({"steps": 0}, 422, "steps must be in [1, 400], got 0"),
    ({"steps": 401}, 422, "steps must be in [1, 400], got 401"),
    ({"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ({"guidance_scale": 50}, 422, "guidance_scale must be in [0, 20], got 50"),
    ({"guidance_scale": -1}, 422, "guidance_scale must be in [0, 20]"),
    ({"eta": 1.5}, 422, "eta must be in [0, 1]"),
    ({"seed": -1}, 422, "seed must be in [0,"),
    ({"num_images": 9}, 422, "num_images must be in [1, 4]"),
    ({"model": "nope"}, 422, "model 'nope' is not served; served models: base, aligned, shapes"),
    ({"reward": "aesthetic"}, 422, "reward 'aesthetic' is not served"),
    ({"steer": "magic", "reward": "brightness"}, 422, "steer 'magic' is not a served steering method"),
    ({"steer": "best-of-n"}, 422, "steer 'best-of-n' needs a reward"),
    ({"steer": "guidance", "reward": "shapes"}, 422, "reward 'shapes' is not differentiable"),
    ({"steer": "fk", "reward": "brightness", "particles": 0}, 422, "particles must be in [1, 16]"),
    ({"model": "shapes", "reward": "shapes", "prompt": "a cat on the moon"}, 422, "outside the ShapesWorld grammar"),
    ({"preview_every": 9}, 422, "preview_every must be in [1, 4]"),
    ({"step": 5}, 422, "step: Extra inputs are not permitted"),
    ({"prompt": None}, 422, "prompt: Input should be a valid string"),
]


@pytest.mark.parametrize("changes, status, message", BAD_BODIES, ids=[m for _, _, m in BAD_BODIES])
def test_bad_input_gets_a_4xx_with_a_message(client, changes, status, message):
    response = client.post("/generate", json={**BODY, **changes})
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert client.post("/generate/stream", json={**BODY, **changes}).status_code == status


def test_every_problem_of_a_request_is_listed_at_once(client):
    detail = client.post("/generate", json={**BODY, "prompt": "", "steps": 0, "model": "x"}).json()["detail"]
    assert "prompt is empty" in detail and "steps must be" in detail and "model 'x'" in detail


@pytest.mark.parametrize("content, status, message", [
    ('{"prompt": "a red', 400, "malformed JSON body"),
    ("[1, 2]", 422, "Input should be a valid dictionary"),
    ("", 422, "body: Field required"),
    (json.dumps({"steps": 4}), 422, "prompt: Field required"),
    (json.dumps({**BODY, "prompt": "x" * 70_000}), 413, "at most 65536"),
])
def test_unreadable_bodies_get_a_4xx_with_a_message(client, content, status, message):
    response = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status and message in response.json()["detail"], response.text


def test_schema_and_page_are_served(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/models", "/generate", "/generate/stream"} <= set(paths)
    assert "GenerateBody" in json.dumps(paths["/generate"]["post"]["requestBody"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and "/generate/stream" in page.text


def test_a_token_guards_everything_but_health(make_app):
    with TestClient(make_app(token=TOKEN)) as guarded:
        assert guarded.get("/health").status_code == 200
        for method, path in [("GET", "/models"), ("GET", "/openapi.json"), ("GET", "/"), ("POST", "/generate"),
                             ("POST", "/generate/stream")]:
            response = guarded.request(method, path, json=BODY)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
            assert "Authorization: Bearer TOKEN" in response.json()["detail"]
        assert guarded.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded.get("/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert guarded.post("/generate", json=BODY, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert guarded.get("/?token=wrong").status_code == 401
        opened = guarded.get(f"/?token={TOKEN}", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # the browser now carries the cookie: the page and the API answer without a header
        assert guarded.get("/").status_code == 200 and guarded.get("/models").status_code == 200
