"""Load test of `anomalab serve`: N concurrent clients on 127.0.0.1, against in-process batched scoring.

A detector (default knn, k = 3; `--detector`, `--params`) is fitted on striped 64 x 64 gray parts (MVTec
layout, written to a temporary folder; the threshold from a held-out 10 %); the server runs as
`anomalab --threads T serve RUN --port P` in its own process. After a warm-up, `--clients` threads, each
with one keep-alive connection, send POST /v1/score requests of one PNG each (the test images in turn)
until `--requests` have been sent or `--seconds` have passed. Reported: requests/s, p50 / p99 latency,
errors (any status but 200: must be 0), the server's resident memory (VmRSS) before and after the load,
the mean batch the server scored (its /healthz counters), and the ratio of the server's images/s to
in-process batched scoring of the same files (`anomalab.scoring.iter_scores`: read, prepare, padded
batches of 32, as `anomalab score`) on the same number of threads.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_serve.py [--clients 16] [--requests 3000] [--seconds 60]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_serve.py --detector padim --params image_size=128
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def write_parts(root: Path, size: int = 64, n_train: int = 200, n_test: int = 64) -> Path:
    """Striped parts: n_train good ones for training; n_test test ones, every other one with a scratch."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]

    def save(path: Path, a: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)

    def good() -> np.ndarray:
        return 110 + 45 * np.sin((xx + 0.4 * yy) / 4 + rng.uniform(0, 6)) + rng.normal(0, 3, (size, size))

    for i in range(n_train):
        save(root / "train" / "good" / f"{i:04d}.png", good())
    for i in range(n_test):
        img = good()
        if i % 2:
            img[np.abs(yy - xx - rng.integers(-16, 16)) <= 1.5] = 255
        save(root / "test" / "mixed" / f"{i:04d}.png", img)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def multipart(name: str, data: bytes, boundary: str = "anomalab-bench") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int, seconds: float) -> dict:
    """Send up to `requests` requests from `clients` threads for at most `seconds`; latencies and errors."""
    lock = threading.Lock()
    sent = [0]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= requests:
                    break
                i = sent[0]
                sent[0] += 1
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/score", body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                payload = r.read()
                ok = r.status == 200 and json.loads(payload)["results"][0]["verdict"] in ("normal", "anomalous")
                message = "" if ok else f"{r.status} {payload[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                message = f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if message:
                    errors.append(message)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "errors": len(errors), "first_errors": errors[:3]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the baseline")
    ap.add_argument("--onnx", action="store_true", help="serve with --onnx")
    ap.add_argument("--detector", default="knn", help="detector to fit and serve (default knn)")
    ap.add_argument("--params", nargs="*", default=None, help="its params as k=v (default for knn: k=3)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data = write_parts(tmp / "parts")
    run = tmp / "run"
    cmd = [sys.executable, "-m", "anomalab.cli"]
    params = args.params if args.params is not None else (["k=3"] if args.detector == "knn" else [])
    subprocess.run([*cmd, "fit", args.detector, *params, "--data", str(data), "--out", str(run), "--no-figures",
                    "--calib-folds", "0"], check=True, capture_output=True)
    files = sorted((data / "test" / "mixed").glob("*.png"))
    bodies = [multipart(p.name, p.read_bytes()) for p in files]

    import torch

    from anomalab import scoring
    from anomalab.registry import load as load_run

    torch.set_num_threads(args.threads)
    det = load_run(run)
    list(scoring.iter_scores(det, files, progress=False))  # warm-up
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        list(scoring.iter_scores(det, files * 4, progress=False))
        best = max(best, 4 * len(files) / (time.perf_counter() - t0))

    port = free_port()
    server = subprocess.Popen([*cmd, "--threads", str(args.threads), "serve", str(run), "--port", str(port),
                               *(["--onnx"] if args.onnx else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                if get_json(port, "/healthz")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
        load(port, bodies, clients=2, requests=64, seconds=30)  # warm-up
        before_rss = rss_mib(server.pid)
        before = get_json(port, "/healthz")
        result = load(port, bodies, args.clients, args.requests, args.seconds)
        after = get_json(port, "/healthz")
        after_rss = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    batches = after["batches"] - before["batches"]
    result.update(detector=" ".join([args.detector, *params]), clients=args.clients, threads=args.threads,
                  engine="onnx" if args.onnx else "torch",
                  rss_before_mib=round(before_rss, 1), rss_after_mib=round(after_rss, 1),
                  mean_batch=round((after["images"] - before["images"]) / max(batches, 1), 1),
                  mean_batch_ms=round(1000 * (after["scoring_s"] - before["scoring_s"]) / max(batches, 1), 1),
                  worker_busy=round((after["scoring_s"] - before["scoring_s"]) / result["seconds"], 2),
                  in_process_images_per_s=round(best, 1), ratio=round(result["requests_per_s"] / best, 2),
                  load_average=round(os.getloadavg()[0], 1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
