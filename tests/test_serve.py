"""`anomalab serve`: every endpoint, every bad input, the token, batching, the ONNX engine (FastAPI TestClient)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import cli
from PIL import Image

pytest.importorskip("fastapi")  # the `serve` extra; installed by `make setup` (dev extra)
pytest.importorskip("multipart")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from anomalab import scoring  # noqa: E402
from anomalab.data import folder  # noqa: E402
from anomalab.predict import ColourScale, overlay  # noqa: E402
from anomalab.registry import load  # noqa: E402
from anomalab.serve.app import create_app  # noqa: E402
from anomalab.serve.batcher import Batcher, Busy  # noqa: E402
from anomalab.thresholds import read_calibration  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG of w x h black 1-bit pixels: a few kilobytes that decode to w*h pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def upload(*named: tuple[str, bytes]) -> list:
    return [("images", (name, data, "application/octet-stream")) for name, data in named]


@pytest.fixture(scope="module")
def run(knn_run):
    return knn_run


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run)) as c:
        yield c


@pytest.fixture(scope="module")
def files(mvtec_tree):
    return [p for kind in ("good", "scratch") for p in sorted((mvtec_tree / "test" / kind).glob("*.png"))]


# ---- the endpoints ------------------------------------------------------------------------------------
def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_model_describes_the_run(client, run):
    info = client.get("/v1/model").json()
    det = load(run)
    assert info["detector"] == "knn" and info["params"]["k"] == 3 and info["input_shape"] == list(det.input_shape_)
    assert info["threshold"] == det.threshold_.to_dict() and info["engine"] == "torch"
    assert info["maps"] and info["overlays"] and info["colour_scale"]["threshold"] == det.threshold_.pixel_value
    assert {"anomalab", "torch", "python", "fastapi", "uvicorn"} <= set(info["versions"])
    assert info["limits"]["max_pixels"] == folder.MAX_PIXELS


def test_scores_equal_anomalab_score_bit_for_bit(client, run, files):
    det = load(run)
    expected = {r["path"].name + r["path"].parent.name: r for r in scoring.iter_scores(det, files, progress=False)}
    r = client.post("/v1/score", files=upload(*[(p.name, p.read_bytes()) for p in files]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] == det.threshold_.value and len(body["results"]) == len(files)
    for p, res in zip(files, body["results"]):
        row = expected[p.name + p.parent.name]
        assert res["name"] == p.name and res["score"] == row["score"] and res["verdict"] == row["verdict"]
        assert res["threshold"] == det.threshold_.value and res["size"] == [16, 16] and "overlay" not in res
    assert {res["verdict"] for res in body["results"]} == {"normal", "anomalous"}


def test_maps_give_the_overlay_on_the_runs_colour_scale(client, run, files):
    det = load(run)
    p = files[-1]
    row = next(scoring.iter_scores(det, [p], maps=True, progress=False))
    level = read_calibration(run)["maps"]["level"]
    expected = overlay(folder.read_image(p, channels=1), row["map"].numpy(), ColourScale.for_run(
        det.threshold_.pixel_value, level))
    res = client.post("/v1/score?maps=true", files=upload((p.name, p.read_bytes()))).json()["results"][0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["overlay"]))))
    assert got.shape == (16, 16, 3) and np.array_equal(got, expected)
    assert res["verdict"] == "anomalous"


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for external in ("http://", "https://", "<link", "src=\"/", "@import", "url("):
        assert external not in page, external
    assert 'type="file"' in page and 'type="range"' in page and "/v1/score" in page
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp


@pytest.mark.parametrize("url", ["/docs", "/redoc", "/openapi.json"])
def test_no_api_docs(client, url):
    assert client.get(url).status_code == 404


# ---- conversion as everywhere else --------------------------------------------------------------------
def test_other_channels_and_sizes_are_converted_like_score(client, run, files, tmp_path):
    det = load(run)
    gray = np.asarray(Image.open(files[-1]))
    rgb = np.stack([gray, gray // 2, gray], -1)
    big = np.asarray(Image.fromarray(gray).resize((40, 24)))
    paths = []
    for name, array in (("rgb.png", rgb), ("big.png", big)):
        (tmp_path / name).write_bytes(png(array))
        paths.append(tmp_path / name)
    expected = [r["score"] for r in scoring.iter_scores(det, paths, progress=False)]
    body = client.post("/v1/score", files=upload(*[(p.name, p.read_bytes()) for p in paths])).json()
    assert [res["score"] for res in body["results"]] == expected
    assert [res["size"] for res in body["results"]] == [[16, 16], [24, 40]]


# ---- bad input -----------------------------------------------------------------------------------------
def test_not_an_image_is_415_naming_the_file(client):
    r = client.post("/v1/score", files=upload(("notes.txt", b"not an image at all")))
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"] and "not an image" in r.json()["detail"]


def test_broken_image_is_400_naming_the_file_and_why(client, files):
    data = files[0].read_bytes()
    r = client.post("/v1/score", files=upload(("cut.png", data[: len(data) // 2])))
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail.startswith("cannot read cut.png") and "/tmp" not in detail and "anomalab-serve" not in detail


def test_empty_file_is_400(client):
    r = client.post("/v1/score", files=upload(("empty.png", b"")))
    assert r.status_code == 400 and "empty.png" in r.json()["detail"]


def test_decompression_bomb_is_413_before_decoding(client):
    data = bomb_png(20_000, 20_000)  # 400 megapixels in about 50 kB
    assert len(data) < 200_000
    t = time.perf_counter()
    r = client.post("/v1/score", files=upload(("bomb.png", data)))
    assert r.status_code == 413 and "bomb.png" in r.json()["detail"]
    assert time.perf_counter() - t < 5


def test_more_pixels_than_max_pixels_is_413(client, files, monkeypatch):
    monkeypatch.setattr(folder, "MAX_PIXELS", 100)  # the limit read_image applies, read when the file comes
    r = client.post("/v1/score", files=upload(("big.png", files[0].read_bytes())))
    assert r.status_code == 413
    assert "big.png" in r.json()["detail"] and "MAX_PIXELS" in r.json()["detail"]


def test_request_over_the_size_limit_is_413(run, files):
    data = files[0].read_bytes()
    with TestClient(create_app(run, max_request_bytes=len(data) // 2, max_images=2)) as small:
        r = small.post("/v1/score", files=upload(("a.png", data)))  # refused from its Content-Length
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()

        def chunks():  # no Content-Length: refused as the bytes arrive
            for i in range(0, len(body), 64):
                yield body[i : i + 64]

        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        r = small.post("/v1/score", content=chunks(), headers=headers)
        assert r.status_code == 413
        assert small.get("/healthz").status_code == 200
    with TestClient(create_app(run, max_images=2)) as few:
        r = few.post("/v1/score", files=upload(*[(f"{i}.png", data) for i in range(3)]))
        assert r.status_code == 413 and "more than 2 files" in r.json()["detail"]
        assert few.post("/v1/score", files=upload(*[(f"{i}.png", data) for i in range(2)])).status_code == 200


def test_no_files_or_not_multipart_is_refused(client):
    r = client.post("/v1/score", files={"path": (None, "/etc/passwd")})  # a text field is no file to read
    assert r.status_code == 400 and "no images" in r.json()["detail"]
    for kwargs in ({"json": {"path": "/etc/passwd"}}, {"data": {"path": "/etc/passwd"}}):
        r = client.post("/v1/score", **kwargs)
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_file_names_are_labels_never_paths(client, files):
    r = client.post("/v1/score", files=upload(("../../etc/passwd/x.png", files[0].read_bytes())))
    assert r.status_code == 200 and r.json()["results"][0]["name"] == "x.png"


def test_a_bad_request_never_affects_the_next(client, files):
    good = upload((files[-1].name, files[-1].read_bytes()))
    first = client.post("/v1/score", files=good).json()["results"][0]["score"]
    for bad in (upload(("x.txt", b"nope")), upload(("bomb.png", bomb_png(12_000, 12_000))), upload(("e.png", b""))):
        assert client.post("/v1/score", files=bad).status_code >= 400
    assert client.post("/v1/score", files=good).json()["results"][0]["score"] == first
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_failing_batch_fails_its_request_only(run, files, monkeypatch):
    with TestClient(create_app(run)) as c:
        model = c.app.state.model
        original = model.score_batch
        calls = {"n": 0}

        def flaky(batch, maps):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return original(batch, maps)

        monkeypatch.setattr(c.app.state.batcher, "fn", flaky)
        good = upload((files[0].name, files[0].read_bytes()))
        r = c.post("/v1/score", files=good)
        assert r.status_code == 500 and "boom" in r.json()["detail"]
        assert c.post("/v1/score", files=good).status_code == 200


# ---- the token -----------------------------------------------------------------------------------------
def test_token_is_required_everywhere_but_the_page(run, files):
    with TestClient(create_app(run, token="s3cret")) as c:
        good = upload((files[0].name, files[0].read_bytes()))
        for method, url, kwargs in (("get", "/healthz", {}), ("get", "/v1/model", {}),
                                    ("post", "/v1/score", {"files": good})):
            r = getattr(c, method)(url, **kwargs)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", url
            r = getattr(c, method)(url, headers={"Authorization": "Bearer wrong"}, **kwargs)
            assert r.status_code == 401, url
            r = getattr(c, method)(url, headers={"Authorization": "Bearer s3cret"}, **kwargs)
            assert r.status_code == 200, url
        assert c.get("/").status_code == 200  # the static page: it asks for the token itself


# ---- batching ------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_together(run, files):
    app = create_app(run, window_s=0.05)
    batcher = app.state.batcher
    payloads = [files[i % len(files)].read_bytes() for i in range(16)]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*[c.post("/v1/score", files=upload((f"{i}.png", d)))
                                          for i, d in enumerate(payloads)])

    try:
        responses = asyncio.run(go())
    finally:
        batcher.stop()
        app.state.model.close()
    assert all(r.status_code == 200 for r in responses)
    det = load(run)
    sent = [files[i % len(files)] for i in range(16)]
    expected = [r["score"] for r in scoring.iter_scores(det, sent, progress=False)]
    assert [r.json()["results"][0]["score"] for r in responses] == expected  # batching changes no score
    assert batcher.stats["images"] == 16 and batcher.stats["batches"] < 16


def test_batcher_pads_to_its_batch_size_and_refuses_when_full():
    seen = []
    gate = threading.Event()

    def fn(batch, maps):
        gate.wait(5)
        seen.append(batch.shape[0])
        return batch.reshape(len(batch), -1).sum(1), None

    b = Batcher(fn, np.stack, lambda x, n: np.concatenate([x, np.zeros((n, *x.shape[1:]))]), batch_size=4,
                window_s=0.01, max_pending=6)
    try:
        first = b.submit([np.ones((1, 2, 2))] * 3)
        time.sleep(0.1)  # the worker has taken the first 3 and waits at the gate
        second = b.submit([np.ones((1, 2, 2)) * 2] * 5)
        with pytest.raises(Busy):
            b.submit([np.ones((1, 2, 2))] * 2)
        gate.set()
        assert first.result(5)[0] == [4.0] * 3 and second.result(5)[0] == [8.0] * 5
        assert seen and set(seen) == {4}
    finally:
        b.stop()


# ---- the ONNX engine -----------------------------------------------------------------------------------
def test_onnx_engine_matches_torch(run, files):
    pytest.importorskip("onnxruntime")
    import torch
    from test_export import score_bound  # knn's parity bound (tests/test_export.py, TOLERANCE)

    det = load(run)
    expected = np.array([r["score"] for r in scoring.iter_scores(det, files, progress=False)])
    with TestClient(create_app(run, onnx=True)) as c:
        assert c.get("/v1/model").json()["engine"] == "onnx"
        body = c.post("/v1/score?maps=true", files=upload(*[(p.name, p.read_bytes()) for p in files])).json()
    got = np.array([res["score"] for res in body["results"]])
    images = torch.stack([torch.from_numpy(folder.read_image(p, channels=1)) for p in files])
    assert np.all(np.abs(got - expected) <= score_bound(det, images, expected))
    assert all(res["overlay"] for res in body["results"])


# ---- the command ---------------------------------------------------------------------------------------
def test_serve_command_help_and_missing_extra(run, monkeypatch):
    code, text = cli("serve", "--help")
    assert code == 0 and "--token" in text and "127.0.0.1" in text
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the extra were not installed
    code, text = cli("serve", run)
    assert code == 2 and "pip install anomalab[serve]" in text and len(text.strip().splitlines()) == 1
