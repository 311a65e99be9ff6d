"""Soak test: the real server under sustained load of good and bad requests.

    python bench/soak.py [--bundle DIR] [--duration 300] [--concurrency 64] [--json OUT]

1. Starts ``python -m service`` (uvicorn, one worker, the default limits) on the bundle
   (default: the repository's default model).
2. From a separate load-generator process, keeps ``--concurrency`` requests in flight for
   ``--duration`` seconds (closed loop, keep-alive connections, raw HTTP/1.1 so that the
   generator costs little CPU). Each request is, at random: ``POST /predict`` with a real
   image (CIFAR-10 test JPEGs from ``../shared``, or generated ones with ``--synthetic``),
   ``POST /predict/batch`` with 4 of them, or, with probability ``--bad-share``, a case of the
   bad-input corpus (``tests/bad_inputs.py``: broken, hostile and odd uploads and bodies),
   each expecting its documented status. Bodies over 1 MiB (the over-size upload) are sent
   as headers and their first 64 KiB: the server must refuse them from ``Content-Length``
   without waiting for the rest.
3. Meanwhile samples the server's resident memory every second and ``GET /readyz`` every
   5 s.
4. Reports: requests sent and answered (must be equal), answers by status, 5xx (must be 0),
   answers other than the expected status (must be 0), p50/p99/max latency per time
   window, resident memory at the end of the warm-up and at the end (growth must be at
   most 10%), and whether the server stayed ready and stopped cleanly on SIGTERM. Exits 1
   if any of these fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "cifar10.tar.gz") + "#cifar10/test"
PARTIAL_OVER = 1 << 20  # bodies larger than this are sent as headers + their first 64 KiB
PARTIAL_SENT = 1 << 16
REQUEST_TIMEOUT = 120.0
MAX_GROWTH = 0.10


# -- load generator (runs in its own process) ------------------------------------------

def raw_request(port: int, path: str, body: bytes, content_type: str | None) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    if content_type:
        head.append(f"Content-Type: {content_type}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                    f"filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + data
                    + b"\r\n" for name, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Answer(Exception):
    """The connection ended or misbehaved before a whole answer arrived."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, whether the server will close the connection, body)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise Answer(f"no complete response head ({type(exc).__name__})") from None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    if "content-length" not in headers:
        raise Answer(f"response without Content-Length: {lines[0]}")
    try:
        body = await reader.readexactly(int(headers["content-length"]))
    except asyncio.IncompleteReadError:
        raise Answer("connection closed in the middle of the response body") from None
    return status, headers.get("connection", "").lower() == "close", body


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _load(port: int, requests: list[dict], good: list[int], batches: list[int],
                bad: list[int], bad_share: float, batch_share: float, concurrency: int,
                duration: float, seed: int) -> dict:
    start = time.perf_counter()
    end = start + duration
    records: list[tuple[float, float, int, int, str]] = []  # done, latency, status, expected, kind
    sent = answered = 0
    failures: list[str] = []

    async def client(k: int) -> None:
        nonlocal sent, answered
        rng = random.Random(seed * 1000 + k)
        reader = writer = None
        while time.perf_counter() < end:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            r = rng.random()
            index = rng.choice(bad if r < bad_share else
                               batches if r < bad_share + batch_share else good)
            req = requests[index]
            data, partial = req["bytes"], len(req["bytes"]) > req["head"] + PARTIAL_OVER
            t0 = time.perf_counter()
            try:
                writer.write(data[:req["head"] + PARTIAL_SENT] if partial else data)
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                failures.append(f"{req['kind']}: write failed ({exc!r}); counted as not sent")
                writer.close()
                reader = writer = None
                continue
            sent += 1
            try:
                status, closes, _ = await asyncio.wait_for(read_response(reader),
                                                           REQUEST_TIMEOUT)
            except (Answer, ConnectionError, OSError, TimeoutError) as exc:
                failures.append(f"{req['kind']}: {exc!r}")
                writer.close()
                reader = writer = None
                continue
            done = time.perf_counter()
            answered += 1
            records.append((done - start, done - t0, status, req["expected"], req["kind"]))
            if closes or partial:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return {"sent": sent, "answered": answered, "failures": failures[:50],
            "failure_count": len(failures), "records": records,
            "elapsed": time.perf_counter() - start}


def loadgen_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.loadgen).read_text())
    folder = Path(args.loadgen).parent
    requests = [{**r, "bytes": (folder / r["file"]).read_bytes()} for r in spec["requests"]]
    by_kind = lambda kinds: [i for i, r in enumerate(requests) if r["group"] in kinds]
    result = asyncio.run(_load(spec["port"], requests, by_kind({"good"}), by_kind({"batch"}),
                               by_kind({"bad"}), spec["bad_share"], spec["batch_share"],
                               spec["concurrency"], spec["duration"], spec["seed"]))
    Path(args.out).write_text(json.dumps(result))


# -- orchestration ---------------------------------------------------------------------

def good_images(source: str | None, count: int) -> tuple[list[bytes], str]:
    if source:
        from training.data.sources import open_dataset

        dataset = open_dataset(source, labeled=True)
        step = max(1, len(dataset.samples) // count)
        return ([p.read_bytes() for p, _ in dataset.samples[::step][:count]],
                f"{count} JPEGs from {source}")
    sys.path.insert(0, str(REPO / "tests"))
    from bad_inputs import encode, noise

    return ([encode(noise(i, (32, 32)), "JPEG", quality=90) for i in range(count)],
            f"{count} generated 32x32 JPEGs")


def memory_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def http_status(port: int, path: str) -> int:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30).status_code
    except httpx.HTTPError:
        return 0


def write_requests(folder: Path, port: int, images: list[bytes], cases) -> list[dict]:
    rng = random.Random(0)
    out = []

    def add(group: str, kind: str, path: str, body: bytes, ctype: str | None, expected: int):
        data = raw_request(port, path, body, ctype)
        name = f"{len(out):05d}.http"
        (folder / name).write_bytes(data)
        out.append({"group": group, "kind": kind, "file": name, "expected": expected,
                    "head": len(data) - len(body)})

    for data in images:
        add("good", "predict", "/predict", *multipart([("image", data)]), 200)
    for _ in range(64):
        add("batch", "predict_batch", "/predict/batch",
            *multipart([("images", rng.choice(images)) for _ in range(4)]), 200)
    for case in cases:
        add("bad", case.name, case.path, case.body, case.content_type, case.status)
    return out


def summarize(result: dict, rss: list[tuple[float, int]], warmup: float, window: float,
              duration: float) -> dict:
    records = result["records"]
    statuses: dict[int, int] = {}
    unexpected: dict[str, dict[str, int]] = {}
    for _, _, status, expected, kind in records:
        statuses[status] = statuses.get(status, 0) + 1
        if status != expected:
            key = f"{kind}: expected {expected}"
            unexpected.setdefault(key, {}).setdefault(str(status), 0)
            unexpected[key][str(status)] += 1
    windows = []
    for w in range(int(duration // window + (duration % window > 1e-9))):
        lo, hi = w * window, min((w + 1) * window, duration)
        lat = sorted(r[1] for r in records if lo <= r[0] < hi)
        mem = [kib for t, kib in rss if lo <= t < hi]
        windows.append({"from_s": lo, "to_s": hi, "answered": len(lat),
                        "req_s": len(lat) / (hi - lo) if hi > lo else 0.0,
                        "p50_ms": percentile(lat, 0.50) * 1000,
                        "p99_ms": percentile(lat, 0.99) * 1000,
                        "max_ms": (lat[-1] * 1000) if lat else float("nan"),
                        "server_errors": sum(1 for r in records if (lo <= r[0] < hi)
                                             and r[2] >= 500),
                        "rss_mib": (max(mem) / 1024) if mem else None})
    at_warmup = next((kib for t, kib in rss if t >= warmup), rss[-1][1])
    at_end = rss[-1][1]
    latencies = sorted(r[1] for r in records)
    return {
        "sent": result["sent"], "answered": result["answered"],
        "lost": result["sent"] - result["answered"],
        "connection_failures": result["failure_count"], "failure_examples": result["failures"],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "unexpected": unexpected, "unexpected_count": sum(
            sum(v.values()) for v in unexpected.values()),
        "bad_requests": sum(1 for r in records if r[4] not in ("predict", "predict_batch")),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
        "windows": windows,
        "rss_after_warmup_mib": at_warmup / 1024, "rss_end_mib": at_end / 1024,
        "rss_peak_mib": max(kib for _, kib in rss) / 1024,
        "rss_growth": (at_end - at_warmup) / at_warmup,
    }


def main() -> None:
    from service.settings import DEFAULT_BUNDLE

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds after which memory is the baseline (default: 10%% of "
                             "the duration, at least 5 s)")
    parser.add_argument("--window", type=float, default=None,
                        help="latency window in seconds (default: duration / 10)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bad-share", type=float, default=0.2,
                        help="share of requests taken from the bad-input corpus")
    parser.add_argument("--batch-share", type=float, default=0.1,
                        help="share of POST /predict/batch requests (4 images each)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="good images (training's syntax)")
    parser.add_argument("--synthetic", action="store_true",
                        help="generated images instead of --data")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="OODSERVE_TORCH_THREADS")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here too")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args)
        return
    warmup = args.warmup if args.warmup is not None else max(5.0, args.duration / 10)
    window = args.window or args.duration / 10

    sys.path.insert(0, str(REPO / "tests"))
    from bad_inputs import build

    images, source = good_images(None if args.synthetic else args.data, args.images)
    cases = build()
    print(f"soak: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; bundle {args.bundle}; {args.duration:.0f} s "
          f"at concurrency {args.concurrency}; good: {source}; bad: {args.bad_share:.0%} of "
          f"requests from {len(cases)} corpus cases; batch requests {args.batch_share:.0%}",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="oodserve-soak-") as tmp:
        tmp = Path(tmp)
        spec = {"port": args.port, "concurrency": args.concurrency, "duration": args.duration,
                "bad_share": args.bad_share, "batch_share": args.batch_share,
                "seed": args.seed, "requests": write_requests(tmp, args.port, images, cases)}
        (tmp / "spec.json").write_text(json.dumps(spec))

        env = {k: v for k, v in os.environ.items() if not k.startswith("OODSERVE_")}
        # One worker: the memory and leak checks below read that one process.
        env.update(OODSERVE_BUNDLE=str(args.bundle), OODSERVE_PORT=str(args.port),
                   OODSERVE_LOG_LEVEL="info", OODSERVE_WORKERS="1")
        if args.threads:
            env.update(OODSERVE_TORCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
        log = tmp / "server.log"
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                                      stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while http_status(args.port, "/readyz") != 200:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not become ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            rss: list[tuple[float, int]] = []
            ready_checks: list[int] = []
            stop = threading.Event()
            started = time.perf_counter()

            def sample_memory() -> None:
                while not stop.is_set():
                    rss.append((time.perf_counter() - started, memory_kib(server.pid)))
                    stop.wait(1.0)

            def check_ready() -> None:
                while not stop.wait(5.0):
                    ready_checks.append(http_status(args.port, "/readyz"))

            samplers = [threading.Thread(target=f, daemon=True)
                        for f in (sample_memory, check_ready)]
            for thread in samplers:
                thread.start()
            load = subprocess.run([sys.executable, __file__, "--loadgen", str(tmp / "spec.json"),
                                   "--out", str(tmp / "result.json")], check=False)
            stop.set()
            for thread in samplers:
                thread.join()
            rss.append((time.perf_counter() - started, memory_kib(server.pid)))
            if load.returncode != 0:
                raise SystemExit(f"load generator failed with {load.returncode}")
            result = json.loads((tmp / "result.json").read_text())
            healthy = (http_status(args.port, "/healthz"), http_status(args.port, "/readyz"))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
        server_log = log.read_text()

    report = summarize(result, rss, warmup, window, args.duration)
    report.update(
        duration_s=args.duration, concurrency=args.concurrency, bundle=str(args.bundle),
        good_images=source, bad_share=args.bad_share, batch_share=args.batch_share,
        warmup_s=warmup, ready_checks=len(ready_checks),
        ready_failures=sum(1 for s in ready_checks if s != 200),
        healthy_at_end=healthy == (200, 200), exit_code=code,
        clean_shutdown=code in (0, -signal.SIGTERM)
        and "Application shutdown complete" in server_log,
        server_log_errors=[line for line in server_log.splitlines()
                           if "ERROR" in line or "Traceback" in line][:20],
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        load_average_end=os.getloadavg()[0])
    checks = {
        "answered == sent": report["lost"] == 0 and report["connection_failures"] == 0,
        "no 5xx": report["server_errors"] == 0,
        "every answer as documented": report["unexpected_count"] == 0,
        f"memory growth after warm-up <= {MAX_GROWTH:.0%}": report["rss_growth"] <= MAX_GROWTH,
        "ready throughout": report["ready_failures"] == 0 and report["healthy_at_end"],
        "clean SIGTERM shutdown": report["clean_shutdown"],
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())

    print(f"{'window':>13} {'answered':>9} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'5xx':>4} {'RSS MiB':>8}")
    for w in report["windows"]:
        rss_text = f"{w['rss_mib']:.0f}" if w["rss_mib"] is not None else "-"
        print(f"{w['from_s']:5.0f}-{w['to_s']:5.0f} s {w['answered']:9d} {w['req_s']:7.1f} "
              f"{w['p50_ms']:8.1f} {w['p99_ms']:8.1f} {w['max_ms']:8.1f} "
              f"{w['server_errors']:4d} {rss_text:>8}")
    print(f"requests: sent {report['sent']}, answered {report['answered']} (lost "
          f"{report['lost']}, connection failures {report['connection_failures']}); of them "
          f"{report['bad_requests']} from the bad-input corpus")
    print(f"statuses: {report['statuses']}; 5xx: {report['server_errors']}; not as "
          f"documented: {report['unexpected_count']} {report['unexpected'] or ''}")
    print(f"latency overall: p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, "
          f"max {report['max_ms']:.1f} ms")
    print(f"server RSS: {report['rss_after_warmup_mib']:.1f} MiB after {warmup:.0f} s of "
          f"warm-up, {report['rss_end_mib']:.1f} MiB at the end "
          f"({report['rss_growth']:+.1%}), peak {report['rss_peak_mib']:.1f} MiB")
    print(f"/readyz checks during the run: {report['ready_checks']}, failed "
          f"{report['ready_failures']}; healthy at the end: {report['healthy_at_end']}; "
          f"SIGTERM exit code {code}")
    for example in report["failure_examples"][:5]:
        print(f"  connection failure: {example}")
    for line in report["server_log_errors"][:5]:
        print(f"  server log: {line}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
