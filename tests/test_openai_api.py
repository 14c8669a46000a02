"""The generation server driven by the real ``openai`` package (``client.videos.*``), no patching.

The T2V server is the session's shared 2-rank one (``tiny_generation_server``); a 1-rank TI2V
server takes an ``input_reference`` upload.
"""
from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
import requests
from PIL import Image

from server_launch import TOKEN, running_server
from stepvideo.io.video import read_mp4
from stepvideo.job_server.openai_fields import blame_sent_field, to_native
from stepvideo.job_server.requests import RequestError

openai = pytest.importorskip("openai", reason="the OpenAI SDK tests need `pip install openai` (the test extra)")

PROMPT = "一只猫在月球上散步"
TINY_JOB = {"fps": 17, "num_inference_steps": 2, "seed": 5}      # 1 s at 17 fps = 17 frames


@pytest.fixture(autouse=True)
def _quiet_sdk_deprecation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # the SDK marks videos.* deprecated for Sora
        yield


def _sdk(server, api_key=TOKEN):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)


def _png(color=(200, 60, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def test_openai_sdk_create_poll_download_list_retrieve_delete(tiny_generation_server, tmp_path):
    client = _sdk(tiny_generation_server)
    assert [m.id for m in client.models.list().data] == ["stepvideo-t2v"]

    video = client.videos.create(prompt=PROMPT, model="stepvideo-t2v", seconds="1", size="64x64",
                                 extra_body={**TINY_JOB, "guidance_scale": 7.5})
    assert (video.status, video.model, video.seconds, video.size, video.progress) == \
        ("queued", "stepvideo-t2v", "1", "64x64", 0)
    done = client.videos.poll(video.id)           # follows the server's openai-poll-after-ms
    assert done.status == "completed" and done.progress == 100 and done.error is None and done.completed_at
    settings = done.to_dict()["settings"]
    assert (settings["guidance_scale"], settings["num_frames"], settings["fps"], settings["seed"]) == (7.5, 17, 17, 5)

    path = tmp_path / "sdk.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    frames, meta = read_mp4(path)
    assert frames.shape == (17, 64, 64, 3) and meta["fps"] == 17
    thumbnail = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    assert thumbnail.format == "JPEG" and thumbnail.size == (64, 64)
    assert np.abs(np.asarray(thumbnail, np.int16) - frames[0]).mean() < 12      # the first frame (JPEG q95)
    webp = client.videos.download_content(video.id, variant="thumbnail", extra_query={"format": "webp"})
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"

    second = client.videos.create(prompt="a second one", model="stepvideo-t2v", seconds="1", size="64x64",
                                  extra_body=TINY_JOB)
    raw = client.videos.with_raw_response.retrieve(second.id)
    if raw.parse().status in ("queued", "in_progress"):          # the SDK's poll sleeps what the server says
        assert 250 <= int(raw.headers["openai-poll-after-ms"]) <= 5000
    else:
        assert "openai-poll-after-ms" not in raw.headers
    ids = [v.id for v in client.videos.list(order="asc", limit=1)]      # the SDK pages on with after=last_id
    assert ids.index(video.id) < ids.index(second.id) and len(ids) == len(set(ids))
    assert [v.id for v in client.videos.list(order="desc", limit=1).data] == [second.id]
    assert client.videos.retrieve(video.id).to_dict() == done.to_dict()
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert client.videos.poll(second.id).status == "completed"


def test_openai_sdk_errors_carry_the_servers_message(tiny_generation_server):
    client = _sdk(tiny_generation_server)
    with pytest.raises(openai.AuthenticationError):
        _sdk(tiny_generation_server, api_key="wrong").videos.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.videos.retrieve("video_unknown")
    assert "video_unknown" in err.value.body["message"]
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as err:
        client.videos.create(prompt="x", size="100x100", extra_body=TINY_JOB)
    assert err.value.body["param"] == "size" and "'size'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt="x", size="64 by 64")
    assert err.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as err:           # one setting, two different values
        client.videos.create(prompt="x", extra_body={"guidance_scale": 6, "cfg_scale": 5})
    assert "'cfg_scale'" in err.value.body["message"] and "'guidance_scale'" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.videos.create(prompt="x", model="sora-2")
    assert err.value.body["param"] == "model" and "stepvideo-t2v" in err.value.body["message"]
    r = requests.get(tiny_generation_server.url + "/v1/videos/video_unknown/content", timeout=10,
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def ti2v_server(tiny_ti2v_model_dir, tiny_service, tmp_path_factory):
    """One rank (no torchrun) is enough for one upload."""
    with running_server(tiny_ti2v_model_dir, tiny_service, tmp_path_factory.mktemp("ti2v-server"), nproc=1) as server:
        yield server


def test_openai_sdk_ti2v_input_reference(ti2v_server, tmp_path):
    client = _sdk(ti2v_server)
    assert [m.id for m in client.models.list().data] == ["stepvideo-ti2v"]
    upload = client.videos.create(prompt=PROMPT, model="stepvideo-ti2v", seconds="1", size="64x64",
                                  input_reference=("first.png", _png(), "image/png"), extra_body=TINY_JOB)
    data_url = "data:image/png;base64," + base64.b64encode(_png((20, 90, 200))).decode()
    r = requests.post(ti2v_server.url + "/v1/videos", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                      json={"prompt": PROMPT, "size": "64x64", "seconds": 1, **TINY_JOB,
                            "input_reference": {"image_url": data_url}})
    assert r.status_code == 202, r.text
    for job_id in (upload.id, r.json()["id"]):
        done = client.videos.poll(job_id)
        assert done.status == "completed" and done.to_dict()["settings"]["image"] is True
    path = tmp_path / "ti2v.mp4"
    client.videos.download_content(upload.id).write_to_file(path)
    assert read_mp4(path)[0].shape == (17, 64, 64, 3)
    with pytest.raises(openai.UnprocessableEntityError) as err:            # a TI2V model needs the image
        client.videos.create(prompt=PROMPT, extra_body=TINY_JOB)
    assert err.value.body["param"] == "image"


def test_shared_fields_map_onto_ours():
    """The mapping alone (no server): rounding, synonyms, the same value twice, what each error names."""
    mapped = to_native({"prompt": "x", "model": "m", "seconds": "4", "size": "992x544", "guidance_scale": 5,
                        "cfg_scale": 5, "flow_shift": 17.0}, "m")
    assert mapped.fields == {"prompt": "x", "cfg_scale": 5, "time_shift": 17.0, "width": 992, "height": 544,
                             "num_frames": 100} and mapped.fps == 25
    assert to_native({"prompt": "x", "seconds": 4, "num_frames": 85}, "m").fields["num_frames"] == 100  # both 85
    assert to_native({"prompt": "x", "seconds": 1, "fps": 17}, "m").fields["num_frames"] == 17
    cases = [({"seconds": "0.2"}, "seconds", 422), ({"seconds": "soon"}, "seconds", 400),
             ({"seconds": float("nan")}, "seconds", 400), ({"size": "992*544"}, "size", 400),
             ({"size": "64x64", "width": 128}, "size", 400), ({"seconds": 1, "fps": 17, "num_frames": 34},
                                                                "seconds", 400),
             ({"fps": 0}, "fps", 422), ({"fps": "25"}, "fps", 400), ({"model": "other"}, "model", 404),
             ({"input_reference": {"image_url": "https://example.com/a.png"}}, "input_reference", 422),
             ({"colour": "red"}, "colour", 400)]
    for fields, param, status in cases:
        with pytest.raises(RequestError) as err:
            to_native({"prompt": "x", **fields}, "m")
        assert (err.value.field, err.value.status) == (param, status) and f"'{param}'" in str(err.value), fields
        conflict = {"size": "width", "seconds": "num_frames"}.get(param)
        if conflict in fields:                                   # one setting twice: both fields named
            assert f"'{conflict}'" in str(err.value), err.value
    blamed = blame_sent_field(RequestError("field 'height': height 100 is not a multiple of 16", "height", 422),
                              {"height": "size"})
    assert (blamed.field, str(blamed)) == ("size", "field 'size': height 100 is not a multiple of 16")
