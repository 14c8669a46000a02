"""The generation server (``run_parallel.py --serve``) as users run it: real processes on CPU.

One caption/VAE service and one server (torchrun, 2 gloo ranks, Ulysses 2, tiny model) per
module; the tests run in file order on it: token and bad requests, 3 concurrent jobs equal to
a ``run_parallel.py`` run, cancels and the full queue, then ``kill -9`` of the launcher and a
restart on the same state dir.
"""
import base64
import collections
import io
import json
import math
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from server_launch import ENV, REPO, TINY, TOKEN, GenerationServer
from server_launch import torchrun as _torchrun
from stepvideo.job_server.client import JobFailed, ServerError, VideoClient
from stepvideo.cli.demo import process_exited, stop
from stepvideo.parallel.launch import free_port
from stepvideo.caption_service.client import wait_ready
from stepvideo.io.video import read_mp4
from stepvideo.job_server import jobs as js
from stepvideo.job_server import state_dir
from stepvideo.job_server.app import ServingContext, create_app
from stepvideo.job_server.config import ServerConfig
from stepvideo.job_server.metrics import ServerMetrics
from stepvideo.job_server.requests import API_FIELDS, UPLOAD_FIELDS
from stepvideo.job_server.worker import Dispatcher
from stepvideo.caption_service.config import ServiceConfig
from stepvideo.caption_service.host import ServiceServer
from stepvideo.testing.connections import health_seconds, idle_connections
from stepvideo.testing.tiny import write_tiny_model_dir

PROMPT = "一只猫在月球上散步"
LONG = 60            # steps of a job that is still running when the test acts on it


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model = write_tiny_model_dir(root / "t2v", variant="t2v")
    port = free_port()
    service = subprocess.Popen([sys.executable, str(REPO / "api" / "call_remote_server.py"), "--model_dir",
                                str(model), "--port", str(port), "--device", "cpu", "--torch_threads", "1"],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    server = reference = None
    shared = {}
    try:
        # started together: the server's start-up check waits for the service's /ready
        # --max_queue 3: the three concurrent submissions fit even before the first one starts
        server = GenerationServer(model, url, root / "state", root / "server.log", max_queue=3)
        wait_ready(url, timeout=180, abort=process_exited(service))
        # the one-shot CLI run the server's frames must equal, while the server loads
        reference = subprocess.Popen(_torchrun("--model_dir", str(model), "--vae_url", url, "--caption_url", url,
                                               "--ulysses_degree", "2", "--save_path", str(root / "cli"), *TINY,
                                               "--prompt", PROMPT, "--seed", "7"),
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.wait_ready()
        shared.update(root=root, model=model, service=url, service_process=service, server=server,
                      reference=reference, jobs={})
        yield shared
    finally:
        if reference is not None and reference.poll() is None:
            reference.kill()
        for launch in {id(s): s for s in (server, shared.get("server")) if s is not None}.values():
            launch.stop()           # the first launch and the restarted one
        stop(service)


def _post(url, token=TOKEN, **kwargs):
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url + "/v1/videos", headers=headers, timeout=30, **kwargs)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_token_health_and_invalid_requests(env):
    url = env["server"].url
    assert requests.get(url + "/health", timeout=10).json()["status"] == "alive"      # no token needed
    r = requests.get(url + "/v1/videos", timeout=10)
    assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
    r = requests.get(url + "/v1/videos", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    assert _post(url, token=None, json={"prompt": "x"}).status_code == 401

    cases = [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, None),
        ({"json": {"prompt": ""}}, 400, "prompt"),
        ({"json": {"prompt": "x", "colour": "red"}}, 400, "colour"),
        ({"json": {"prompt": "x", "num_inference_steps": "2"}}, 400, "num_inference_steps"),
        ({"json": {"prompt": "x", "cfg_scale": -1}}, 422, "cfg_scale"),
        ({"json": {"prompt": "x", "num_inference_steps": 1000}}, 422, "num_inference_steps"),
        ({"json": {"prompt": "x", "height": 8}}, 422, "height"),
        ({"json": {"prompt": "x", "preset": "fast"}}, 422, "preset"),
        ({"json": {"prompt": "x", "image": "not base64!"}}, 400, "image"),
        ({"json": {"prompt": "x", "image": base64.b64encode(_png()).decode()}}, 422, "image"),   # a T2V model
        ({"data": {"prompt": "x"}, "files": {"image": ("a.png", _png(), "image/png")}}, 422, "image"),
        ({"data": {"prompt": "x", "seed": "seven"}, "files": {"other": ("a", b"1")}}, 400, "other"),
        ({"data": "prompt=x", "headers": {"Content-Type": "text/plain"}}, 415, None),
    ]
    for kwargs, status, field in cases:
        r = _post(url, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        error = r.json()["error"]          # the OpenAI shape: {"message", "type", "param", "code"}
        assert error["message"] and error["type"] and error["code"]
        if field is not None:
            assert error["param"] == field and field in error["message"], error
    client = env["server"].client
    with pytest.raises(ServerError) as err:
        client.get("video_unknown")
    assert err.value.status == 404
    with pytest.raises(ServerError) as err:
        client.list(limit=0)
    assert err.value.status == 400
    r = requests.get(f"{url}/v1/videos/video_unknown", params={"wait": "soon"}, timeout=10,
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "wait"
    assert client.list()["data"] == []            # nothing was queued by the bad requests


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def _raw_json(url, text):
    return _post(url, data=text.encode("utf-8"), headers={"Content-Type": "application/json"})


def test_hostile_bodies_get_4xx_naming_the_field_and_queue_nothing(env):
    """Issue 26, items 1-4, 9, 10: lone surrogates, deep nesting, non-finite numbers, shapes the
    VAE service can never decode or the layout cannot hold, oversized forms; none is queued."""
    url = env["server"].url
    shape = '"height": 64, "width": 64, "num_frames": 17'
    cases = [   # (raw JSON text, status, field or None, words in the error)
        ('{"prompt": "a", "negative_prompt": "\\ud800", ' + shape + '}', 400, "negative_prompt", "surrogate"),
        ('{"prompt": "a\\udfff b", ' + shape + '}', 400, "prompt", "surrogate"),
        ('{"prompt": "a", "height": ' + "[" * 1000 + "]" * 1000 + '}', 400, None, "nests"),
        ('{"prompt": "a", "height": ' + "[" * 100000 + "]" * 100000 + '}', 400, None, "nests"),
        ('{"prompt": "a", "height": [64]}', 400, "height", "plain value"),
        ('{"prompt": "a", "cfg_scale": Infinity, ' + shape + '}', 400, None, "finite"),
        ('{"prompt": "a", "cfg_scale": 1e400, ' + shape + '}', 400, "cfg_scale", "finite"),
        ('{"prompt": "a", "cfg_scale": 1e308, ' + shape + '}', 422, "cfg_scale", "[0, 100]"),
        ('{"prompt": "a", "time_shift": NaN, ' + shape + '}', 400, None, "NaN"),
        ('{"prompt": "a", "motion_score": -Infinity, ' + shape + '}', 400, None, "finite"),
        ('{"prompt": "a", "height": 16, "width": 8192, "num_frames": 17}', 422, "num_frames", "VAE service"),
        ('{"prompt": "a", "height": 16, "width": 16, "num_frames": 510}', 422, "num_frames", "VAE service"),
        ('{"prompt": "a", "height": 16, "width": 404736, "num_frames": 17}', 422, "num_frames", "VAE service"),
    ]
    for text, status, field, words in cases:
        r = _raw_json(url, text)
        assert r.status_code == status, (text[:80], r.text[:300])
        body = r.json()
        assert words in body["error"]["message"] and len(r.content) < 1000, body
        if field is not None:
            assert body["error"]["param"] == field, body
    for value in ("inf", "nan", "-Infinity", "1e999"):           # the same numbers in a multipart form
        r = _post(url, files={"prompt": (None, "a"), "cfg_scale": (None, value)})
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == "cfg_scale", r.text

    ready = requests.get(url + "/ready", headers=_auth(), timeout=10).json()
    limits = ready["job_limits"]                       # learned from the service's /ready at start-up
    assert limits["max_latent_frames"] == 64 and limits["max_latent_side"] == 256, ready
    assert "model_dir" not in ready and str(env["root"]) not in json.dumps(ready)
    service_ready = requests.get(env["service"] + "/ready", timeout=10).json()
    assert service_ready["limits"]["max_latent_side"] == 256 and "model_dir" not in service_ready
    fits = limits["max_tokens_memory"]                 # what the memory model says the ranks hold
    side = min(159, math.isqrt(fits // 3) + 2)         # 3 latent frames x side^2 tokens, within --max_tokens
    if 3 * side * side > fits:
        r = _post(url, json={"prompt": "a", "num_frames": 17, "height": side * 16, "width": side * 16})
        assert r.status_code == 422 and "memory" in r.json()["error"]["message"], r.text

    # a 10 MB multipart prompt: 413 naming the per-field limit, not the 32 MiB body limit
    r = _post(url, files={"prompt": (None, "x" * (10 << 20))})
    assert r.status_code == 413 and "33554432" not in r.text and "text field" in r.json()["error"]["message"], r.text[:300]
    # 200k unknown url-encoded fields: refused before parsing, with a short body
    start = time.perf_counter()
    r = _post(url, data="&".join(f"f{i}=1" for i in range(200_000)),
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and len(r.content) < 500 and time.perf_counter() - start < 5, r.text[:300]
    r = _post(url, json={"prompt": "a", **{f"unknown{i}": 1 for i in range(1000)}})
    assert r.status_code == 400 and "and 995 more" in r.json()["error"]["message"] and len(r.content) < 1000, r.text[:300]
    assert env["server"].client.list()["data"] == []           # nothing was queued


def test_health_answers_with_150_idle_connections_on_both_servers(env):
    """Issue 26, item 8: waitress's default connection_limit (100) let idle sockets (or slow ones,
    a header byte now and then) block /health, on both servers."""
    for url in (env["server"].url, env["service"]):
        with idle_connections(url, 100), idle_connections(url, 50, send=b"G"):    # idle, and slow headers
            time.sleep(0.2)                           # the server has accepted what it will accept
            assert health_seconds(url, timeout=1.0) < 1.0
            r = requests.get(url + "/ready", headers=_auth(), timeout=1.0)   # an API client gets through too
            assert r.status_code == 200


def test_three_concurrent_jobs_equal_the_cli(env, tmp_path):
    client = env["server"].client
    seen, results, errors = {}, {}, []

    def one(seed, multipart):
        try:
            if multipart:        # the same job as a multipart form (all fields are strings there)
                r = _post(client.url, files={"prompt": (None, PROMPT), "seed": (None, str(seed))})
                assert r.status_code == 202, r.text
                job = r.json()
            else:
                job = VideoClient(client.url, token=TOKEN).submit(PROMPT, seed=seed)
            assert job["status"] == "queued" and job["id"].startswith("video_")
            values = []
            while True:
                state = client.get(job["id"])
                values.append(state["progress"])
                if state["status"] in js.FINISHED:
                    break
                time.sleep(0.05)
            seen[seed] = values
            results[seed] = client.download(job["id"], tmp_path / f"{seed}.mp4"), state
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(seed, seed == 9)) for seed in (7, 8, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for seed, values in seen.items():
        assert values == sorted(values), f"progress went down for seed {seed}: {values}"
        assert values[-1] == 100 and all(isinstance(v, int) for v in values)
    frames = {seed: read_mp4(path)[0] for seed, (path, _) in results.items()}
    for seed, (_, job) in results.items():
        assert job["status"] == "completed" and job["settings"]["seed"] == seed
        assert job["settings"]["preset"] == "t2v" and job["settings"]["num_inference_steps"] == 2
        assert len(job["timings"]["steps_s"]) == 2 and job["timings"]["summary"].startswith("timing: encode")
        assert frames[seed].shape == (17, 64, 64, 3)
        env["jobs"][seed] = (job["id"], Path(results[seed][0]).read_bytes())
    assert not np.array_equal(frames[7], frames[8])

    reference = env["reference"]
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]
    assert "timing: encode" in err                     # the one-line summary of every run
    np.testing.assert_array_equal(read_mp4(out.strip().splitlines()[-1])[0], frames[7])

    listed = [job["id"] for job in client.list(limit=2)["data"]]
    everything = [job["id"] for job in client.iter_jobs(page=1)]
    assert len(everything) == 3 and everything[:2] == listed          # newest first, paged with after
    created = [client.get(i)["created_at"] for i in everything]
    assert created == sorted(created, reverse=True)
    metrics = requests.get(client.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    assert 'stepvideo_server_jobs{status="completed"} 3.0' in metrics
    assert "stepvideo_server_step_seconds_count 6.0" in metrics and "stepvideo_server_queue_depth 0.0" in metrics


def _wait_for(client, job_id, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if predicate(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state; last {job}")


def _denoising(job):
    assert job["status"] not in js.FINISHED, job
    return job["status"] == "in_progress" and (job["stage"] or "").startswith("denoising")


def test_cancel_queued_and_running_and_full_queue(env):
    client = env["server"].client
    running = client.submit("a long one", seed=1, num_inference_steps=LONG)
    _wait_for(client, running["id"], _denoising)
    queued = [client.submit("waits", seed=s) for s in (2, 3, 6)]       # --max_queue 3
    with pytest.raises(ServerError) as err:
        client.submit("one too many")
    assert err.value.status == 429 and "retry after" in str(err.value)
    r = _post(client.url, json={"prompt": "one too many"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1

    for job in (queued[0], queued[2]):                              # a queued job: at once
        assert client.cancel(job["id"])["status"] == "cancelled"
    r = requests.delete(f"{client.url}/v1/videos/{running['id']}", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10)
    assert r.status_code == 202 and r.json()["cancel_requested"]     # a running one: at the next step
    start = time.monotonic()
    r = requests.get(f"{client.url}/v1/videos/{running['id']}", params={"wait": 50}, timeout=60,
                     headers={"Authorization": f"Bearer {TOKEN}"})        # a long poll: answers when it ends
    job = r.json()
    assert job["status"] == "cancelled" and job["progress"] < 100 and time.monotonic() - start < 40
    assert 1 <= len(job["timings"]["steps_s"]) < LONG
    with pytest.raises(ServerError) as err:
        client.download(running["id"], env["root"] / "nothing.mp4")
    assert err.value.status == 409
    with pytest.raises(JobFailed):
        client.wait(queued[0]["id"], progress=False)
    assert not (env["root"] / "nothing.mp4").exists()
    job = client.wait(queued[1]["id"], poll=0.1, progress=False)      # the rest of the queue still runs
    assert job["status"] == "completed"
    # deleting a finished job removes its file and its record
    assert client.cancel(job["id"])["deleted"] is True
    assert not (env["root"] / "state" / "videos" / f"{job['id']}.mp4").exists()
    with pytest.raises(ServerError) as err:
        client.get(job["id"])
    assert err.value.status == 404


def test_kill_minus_nine_then_restart_on_the_same_state_dir(env):
    server = env["server"]
    client = server.client
    running = client.submit("interrupted", seed=4, num_inference_steps=LONG)
    _wait_for(client, running["id"], _denoising)
    waiting = client.submit("waits for the restart", seed=5)
    server.kill_launcher()
    _truncated_database_is_refused_then_restored_with_bad_rows(env)

    env["server"] = server = GenerationServer(env["model"], env["service"], env["root"] / "state",
                                              env["root"] / "server.log", max_queue=3)
    server.wait_ready()
    client = server.client
    for seed in (7, 8, 9):                          # completed jobs: listed and downloadable, same bytes
        job_id, data = env["jobs"][seed]
        assert client.get(job_id)["status"] == "completed"
        r = requests.get(f"{client.url}/v1/videos/{job_id}/content", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4" and r.content == data
    job = client.get(running["id"])                 # the interrupted job was re-queued (and counted)
    assert job["status"] in ("queued", "in_progress") and job["attempts"] >= 1, job
    client.cancel(running["id"])
    job = client.wait(waiting["id"], poll=0.1, progress=False)
    assert job["status"] == "completed"
    _wait_for(client, running["id"], lambda j: j["status"] in js.FINISHED)

    # issue 26, item 7: the bad rows fail (or show) alone, the server goes on
    bad = _wait_for(client, "video_badrow", lambda j: j["status"] in js.FINISHED, timeout=60)
    assert bad["status"] == "failed" and "stored settings" in bad["error"]["message"] and server.proc.poll() is None, bad
    assert client.get(env["jobs"][9][0])["settings"] == {}                       # unreadable JSON: listed
    assert client.get(env["jobs"][8][0])["settings"]["neg_magic"] == "\ufffd"   # a stored lone surrogate
    assert len(client.list(limit=100)["data"]) >= 7

    videos = env["root"] / "state" / "videos"
    files = {p.name for p in videos.iterdir()}
    completed = {f"{j['id']}.mp4" for j in client.iter_jobs() if j["status"] == "completed"}
    assert files == completed and len(completed) == 4          # no file without a record, nor the reverse


def _truncated_database_is_refused_then_restored_with_bad_rows(env):
    """Issue 26, items 6, 7 and 5, on the stopped server's state dir: a 0-byte jobs.sqlite3 (after
    kill -9, WAL present) stops the start with one line per rank naming the file, and every video
    stays. Then the backup is restored with three bad rows: a queued job whose settings do not fit
    ``SamplingConfig``, a completed one with unreadable settings, one with a stored lone surrogate;
    and a latents file whose job is gone."""
    state = env["root"] / "state"
    videos = state / "videos"
    db = state / "jobs.sqlite3"
    backup = {path.name: path.read_bytes() for path in state.glob("jobs.sqlite3*")}
    before = sorted(p.name for p in videos.glob("*.mp4"))
    assert len(before) == 3 and (state / "jobs.sqlite3-wal").exists()
    db.write_bytes(b"")
    refused = GenerationServer(env["model"], env["service"], state, env["root"] / "refused.log")
    assert refused.proc.wait(timeout=180) != 0
    refused.stop()
    log = (env["root"] / "refused.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all(f"{db} is empty" in line for line in lines), log[-3000:]   # one per rank
    assert "stepvideo/serving" not in log, log[-3000:]                 # no traceback of ours
    assert sorted(p.name for p in videos.glob("*.mp4")) == before      # nothing deleted

    for name, data in backup.items():                                  # the fix the line names
        (state / name).write_bytes(data)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO jobs (id, status, created_at, prompt, settings, timings) VALUES "
                 "('video_badrow', 'queued', 1.0, 'old', '{\"sampler\": \"unknown\"}', '{}')")
    conn.execute("UPDATE jobs SET settings = '{not json' WHERE id = ?", (env["jobs"][9][0],))
    conn.execute("UPDATE jobs SET settings = ? WHERE id = ?", ('{"neg_magic": "\\ud800"}', env["jobs"][8][0]))
    conn.commit()
    conn.close()
    (videos / "video_gone.latents.safetensors").write_bytes(b"x")      # reconciled with its (gone) job



FUZZ_SECONDS = 15.0
FUZZ_REQUESTS = 300
_FUZZ_NUMBERS = ["0", "-1", "1", "16", "17", "64", "2147483648", "9223372036854775808", "1" + "0" * 400, "1e308",
                 "-1e308", "1e400", "NaN", "Infinity", "-Infinity", "-0.0", "5e-324", "3.5", "true", "null"]
_FUZZ_STRINGS = ['""', '" "', '"a"', '"\\ud800"', '"x\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\u202e"',
                 '"一只猫"', '"t2v"', '"data:image/png;base64,AAAA"', '"' + "x" * 8192 + '"', '"' + "x" * 8193 + '"']
_FUZZ_FORM = [b"inf", b"nan", b"-Infinity", b"1e999", b"0x10", b"", b"17", b"64", b"\x00", b"\xed\xa0\x80",
              b"\xff\xfe", "一只猫".encode(), b"x" * 8193, b"9" * 5000]


def _fuzz_json_value(rng, depth=0):
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(_FUZZ_NUMBERS)
    if roll < 0.85 or depth > 2:
        return rng.choice(_FUZZ_STRINGS)
    levels = rng.choice([1, 2, 7, 8, 9, 40, 5000])
    inner = _fuzz_json_value(rng, depth + 1)
    return ("[" * levels + inner + "]" * levels) if rng.random() < 0.5 else \
        ('{"k": ' * levels + inner + "}" * levels)


def _fuzz_request(rng, names):
    """One random request: (kwargs for requests.post, a label)."""
    fields = rng.sample(names, rng.randint(0, min(6, len(names))))
    if rng.random() < 0.3:
        fields.append(rng.choice(["colour", "\\ud800", "x" * 300, "__proto__", "prompt"]))
    kind = rng.random()
    if kind < 0.6:
        parts = [f'"{name}": {_fuzz_json_value(rng)}' for name in fields]
        if rng.random() < 0.7:
            parts.insert(0, '"prompt": "a"')
        text = "{" + ", ".join(parts) + "}"
        if rng.random() < 0.1:
            text = text[:rng.randint(0, len(text))]                   # truncated
        if rng.random() < 0.05:
            text = rng.choice(["[]", "1", '"prompt"', "null", ""])    # not an object
        body = text.encode("utf-8")
        if rng.random() < 0.05:
            body = body[:-1] + b"\xff"                                  # invalid UTF-8
        return {"data": body, "headers": {"Content-Type": "application/json"}}, "json"
    form = {name: rng.choice(_FUZZ_FORM) for name in fields}
    if kind < 0.9:
        files = {name: (None, value) for name, value in form.items()}
        if rng.random() < 0.3:
            files[rng.choice([*UPLOAD_FIELDS, "other"])] = ("a.png", bytes(rng.randrange(256) for _ in range(64)))
        files.setdefault("prompt", (None, b"a"))
        return {"files": files}, "multipart"
    return {"data": form, "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, "urlencoded"


def test_fuzz_gives_no_5xx_and_the_server_stays_healthy(env):
    """Issue 26: a few hundred random JSON / multipart / url-encoded bodies (fixed seed, bounded
    time) with wrong types, non-finite numbers, lone surrogates, nesting and sizes at and over the
    limits. Field names come from the request schema, so new fields are fuzzed too."""
    url = env["server"].url
    names = sorted(API_FIELDS)
    rng = random.Random(26)
    statuses = collections.Counter()
    limit = 32 << 20                                                    # --max_body_mb default
    fixed = [({"data": b'{"prompt": "' + b"x" * (limit - 20) + b'"}', "headers": {"Content-Type": "application/json"}},
              "at the body limit"),
             ({"data": b'{"prompt": "' + b"x" * (limit + 10) + b'"}', "headers": {"Content-Type": "application/json"}},
              "over the body limit")]
    start = time.monotonic()
    sent = 0
    while sent < FUZZ_REQUESTS and time.monotonic() - start < FUZZ_SECONDS:
        kwargs, label = fixed.pop() if fixed else _fuzz_request(rng, names)
        r = _post(url, **kwargs)
        sent += 1
        statuses[r.status_code] += 1
        assert r.status_code < 500, (label, kwargs.get("data", b"")[:200], r.text[:300])
        if r.status_code == 202:                                        # accepted: cancel, keep the server free
            requests.delete(f"{url}/v1/videos/{r.json()['id']}", headers=_auth(), timeout=10)
        elif r.status_code >= 400:
            assert len(r.content) < 2000 and r.json()["error"], (label, r.text[:300])
    print(f"fuzz: {sent} requests in {time.monotonic() - start:.1f} s: {dict(sorted(statuses.items()))}")
    assert sent >= 100 and not fixed
    assert health_seconds(url, timeout=1.0) < 1.0
    assert requests.get(url + "/ready", headers=_auth(), timeout=10).status_code == 200


def test_failed_decode_names_no_path_and_its_latents_go_with_the_job(env):
    """Issue 26, items 5 and 9, last in the module (it stops the caption/VAE service): a job whose
    decode fails tells the client the stage, not the latents path, the decode command or the
    service URL; the latents it leaves go when the job is deleted."""
    client = env["server"].client
    job = client.submit("its decode fails", seed=12, num_inference_steps=20)
    _wait_for(client, job["id"], _denoising)
    env["service_process"].kill()                                       # the VAE service dies mid-run
    job = _wait_for(client, job["id"], lambda j: j["status"] in js.FINISHED, timeout=120)
    assert job["status"] == "failed" and "while decoding" in job["error"]["message"], job
    for secret in (str(env["root"]), env["service"], "127.0.0.1", "latents", "python -m"):
        assert secret not in job["error"]["message"], job["error"]
    latents = env["root"] / "state" / "videos" / f"{job['id']}.latents.safetensors"
    assert latents.is_file()                                             # kept for the operator
    assert client.cancel(job["id"])["deleted"] is True
    assert not latents.exists()
    assert health_seconds(env["server"].url, timeout=1.0) < 1.0


def test_reconcile_after_a_crash(tmp_path):
    """What a restart finds on disk, written by hand: every kind of leftover is repaired."""
    store = js.JobStore.open(tmp_path)
    done = store.add("done", {}, None, max_queue=10)
    lost = store.add("lost", {}, None, max_queue=10)
    ran = store.add("ran", {}, None, max_queue=10)
    for job in (done, lost, ran):
        assert store.claim_next().id == job.id
    store.video_path(done.id).write_bytes(b"mp4")
    store.finish(done.id, js.COMPLETED)
    store.video_path(lost.id).write_bytes(b"mp4")
    store.finish(lost.id, js.COMPLETED)
    store.video_path(lost.id).unlink()                         # completed, file gone
    (store.videos_dir / "video_orphan.mp4").write_bytes(b"x")  # a file without a record
    (store.videos_dir / "video_gone.latents.safetensors").write_bytes(b"x")   # latents without a record
    (store.videos_dir / f".{ran.id}.123.partial.mp4").write_bytes(b"x")    # an interrupted write
    with pytest.raises(js.StateDirBusy):
        js.JobStore.open(tmp_path)                             # one server per state dir
    store.close()

    store = js.JobStore.open(tmp_path)
    assert store.get(done.id).status == js.COMPLETED
    assert store.get(lost.id).status == js.FAILED and "missing" in store.get(lost.id).error
    assert store.get(ran.id).status == js.QUEUED and store.get(ran.id).attempts == 1
    assert sorted(p.name for p in store.videos_dir.iterdir()) == [f"{done.id}.mp4"]
    assert (tmp_path / js.ORPHANS / "video_orphan.mp4").is_file()      # kept aside, never deleted
    assert store.claim_next().id == ran.id                    # second attempt, then a crash again:
    store.close()
    store = js.JobStore.open(tmp_path)
    assert store.get(ran.id).status == js.FAILED and js.RESTARTED in store.get(ran.id).error
    store.close()


def test_state_dir_checks_name_the_path(tmp_path):
    """Issue 26, item 10: a state dir whose videos/ cannot be written, or a damaged database, stops
    the start with a line naming the path (root ignores permissions, so videos/ is a file here)."""
    (tmp_path / "videos").write_text("not a folder")
    with pytest.raises(state_dir.StateDirError, match=f"{tmp_path / 'videos'} is not a folder"):
        js.JobStore.open(tmp_path)
    (tmp_path / "videos").unlink()
    store = js.JobStore.open(tmp_path)
    job = store.add("p", {}, None, max_queue=1)
    store.claim_next()
    store.video_path(job.id).write_bytes(b"mp4")
    store.finish(job.id, js.COMPLETED)
    store.close()
    db = tmp_path / "jobs.sqlite3"
    db.write_bytes(db.read_bytes()[:1024] + b"\0" * 100)            # truncated
    with pytest.raises(state_dir.StateDirError, match="jobs.sqlite3 is unreadable"):
        js.JobStore.open(tmp_path)
    db.unlink()
    with pytest.raises(state_dir.StateDirError, match="jobs.sqlite3 is missing; 1 video"):
        js.JobStore.open(tmp_path)
    assert store.video_path(job.id).is_file()


def test_internal_errors_name_no_path_or_exception(tmp_path):
    """Issue 26, item 9: a 500 carries a reference, not the exception text (here: the store's
    database closed under a running server)."""
    store = js.JobStore.open(tmp_path / "state")
    ctx = ServingContext(store=store, config=ServerConfig(port=0), metrics=ServerMetrics(store.counts),
                         dispatcher=Dispatcher(store))
    server = ServiceServer(create_app(ctx), ServiceConfig(port=0)).start()
    try:
        store.close()
        r = requests.get(f"http://127.0.0.1:{server.port}/v1/videos", timeout=10)
        assert r.status_code == 500 and "reference err_" in r.json()["error"]["message"], r.text
        assert "ProgrammingError" not in r.text and str(tmp_path) not in r.text and "closed" not in r.text
    finally:
        server.close()
