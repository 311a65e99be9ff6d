"""Throughput and latency of the real service against the model alone, in one run.

    python bench/serve.py [--bundle DIR] [--workers N|auto] [--duration 5] [--concurrency 1,8,32,64]

1. Reads ``--images`` real JPEGs (default: CIFAR-10 test, ``../shared/data/cifar10.tar.gz``).
2. Model alone, no HTTP, in this process: median latency of a single-image forward pass and
   the throughput of batched forward passes (batch = the server's max batch size), both
   through :func:`training.evaluation.score_batch` as the service runs it. Measured just
   before and just after each concurrency level (the service started but idle), and each
   level is compared with the mean of its two readings: on a shared machine the model
   alone's speed drifts by tens of percent within minutes, so a reading taken minutes away
   from the level it is compared with says more about the machine than about the service.
3. Starts ``python -m service`` (``--workers`` worker processes, by default the service's
   own default: one per core on a CPU, each with its share of the cores as torch threads)
   and, from a separate load-generator process, keeps C requests in flight (closed loop:
   each of C keep-alive connections sends the next ``POST /predict`` when the last answer
   arrives) for each concurrency C; then the same service with batching off (max batch 1)
   at ``--unbatched-concurrency``, and the batched service once more at that concurrency.
   Batching off is compared with the mean of the batched service's readings at that
   concurrency before and after it (the first within a minute or two), for the same reason
   as the model alone: otherwise the two services run minutes apart.
4. Prints req/s, p50/p95/p99 latency, the service's memory, the CPU time per request of all
   its processes, the mean batch size and the share of wall time the inference threads
   spent in forward passes (mean over workers; near 100%: the model is the bottleneck), and
   the targets: at concurrency 32, >= 60% of raw batched throughput and >= 2x the unbatched
   service; at concurrency 1, p50 <= raw single-image forward + 5 ms; memory <= 1 GiB.

Memory is the sum of the proportional set size (PSS) of the service's processes: each
process's private pages plus its share of the pages it shares (the libraries that every
worker maps), so that N workers are not counted as N full copies of torch's code. With one
worker it is close to that process's RSS; the largest RSS peak of any process is printed too.

The load generator speaks HTTP/1.1 over raw asyncio streams with pre-encoded requests, so
that on a small machine it costs as little CPU as possible; it still shares the machine
with the server, as any client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "cifar10.tar.gz") + "#cifar10/test"


# -- load generator (runs in its own process) ------------------------------------------

def _request(host: str, port: int, image: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                  if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return status


async def _load(host: str, port: int, requests: list[bytes], concurrency: int,
                warmup: float, duration: float) -> dict:
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    latencies: list[float] = []
    errors = total = 0

    async def client(k: int) -> None:
        nonlocal errors, total
        reader, writer = await asyncio.open_connection(host, port)
        i = k
        while time.perf_counter() < window[1]:
            sent = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            done = time.perf_counter()
            i += concurrency
            total += 1
            if window[0] <= done <= window[1]:
                latencies.append(done - sent)
                errors += status != 200
        writer.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"concurrency": concurrency, "requests": len(latencies), "all_requests": total,
            "errors": errors,
            "rps": len(latencies) / duration, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99)}


def loadgen_main(args: argparse.Namespace) -> None:
    images = [p.read_bytes() for p in sorted(Path(args.loadgen).iterdir())]
    requests = [_request("127.0.0.1", args.port, image) for image in images]
    result = asyncio.run(_load("127.0.0.1", args.port, requests, args.level, args.warmup,
                               args.duration))
    print(json.dumps(result))


# -- orchestration ---------------------------------------------------------------------

def read_images(source: str, count: int) -> list[bytes]:
    from training.data.sources import open_dataset

    dataset = open_dataset(source, labeled=True)
    step = max(1, len(dataset.samples) // count)
    return [path.read_bytes() for path, _ in dataset.samples[::step][:count]]


class ModelAlone:
    """The model with no HTTP: median single-image forward time and batched throughput."""

    def __init__(self, bundle_dir: Path, images: list[bytes], batch_size: int):
        import io

        import torch
        from PIL import Image

        from service.inference import memory_format_for
        from training.bundle import load_bundle
        from training.data.folders import load_rgb

        bundle = load_bundle(bundle_dir)
        m = bundle.manifest
        transform = m.preprocessing.eval_transform()
        x = torch.stack([transform(load_rgb(Image.open(io.BytesIO(b)))) for b in images])
        while len(x) < batch_size:
            x = torch.cat([x, x])
        layout = memory_format_for(torch.device("cpu"))  # the service's, on the same device
        self.model = bundle.model.to(memory_format=layout)
        self.x, self.batch_size = x.contiguous(memory_format=layout), batch_size
        self.taps = [m.featurenorm.selected_block]

    def measure(self, duration: float) -> dict:
        import torch

        from training.evaluation import score_batch

        model, x, n, taps = self.model, self.x, self.batch_size, self.taps
        with torch.inference_mode():
            for size in (1, n):
                score_batch(model, x[:size], taps)  # warm-up
            singles, end, i = [], time.perf_counter() + duration, 0
            while time.perf_counter() < end:
                t = time.perf_counter()
                score_batch(model, x[i % len(x):i % len(x) + 1], taps)
                singles.append(time.perf_counter() - t)
                i += 1
            batches, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration:
                offset = (batches * n) % (len(x) - n + 1)
                score_batch(model, x[offset:offset + n], taps)
                batches += 1
            elapsed = time.perf_counter() - start
        return {"single_ms": statistics.median(singles) * 1000,
                "batched_img_s": batches * n / elapsed}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batching_stats(port: int) -> tuple[float, float, float]:
    """(forward passes, images in them, seconds spent in them) from the server's metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(
        httpx.get(f"http://127.0.0.1:{port}/metrics").text) for s in f.samples}
    return (values["oodserve_batch_size_count"], values["oodserve_batch_size_sum"],
            values["oodserve_inference_duration_seconds_sum"])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the supervisor and its workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except FileNotFoundError:
            children = []
        pids += [int(c) for c in children]
        i += 1
    return pids


def _proc_field(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_memory_kib(pid: int) -> dict:
    """PSS summed over the tree, and the largest RSS peak (VmHWM) of any one process."""
    pids = process_tree(pid)
    return {"pss_kib": sum(_proc_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids),
            "rss_peak_kib": max(_proc_field(f"/proc/{p}/status", "VmHWM") for p in pids),
            "processes": len(pids)}


class Server:
    def __init__(self, bundle: Path, port: int, workers: str, threads: int | None,
                 max_batch: int, log: Path):
        env = dict(os.environ)  # OODSERVE_* set by the caller apply, these win
        env.update(OODSERVE_BUNDLE=str(bundle), OODSERVE_PORT=str(port),
                   OODSERVE_WORKERS=workers, OODSERVE_MAX_BATCH_SIZE=str(max_batch),
                   OODSERVE_LOG_LEVEL="warning")
        if threads is not None:
            env.update(OODSERVE_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        self.port, self.log = port, log
        with open(log, "w") as out:  # the child keeps its own handle
            self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until /readyz answers 200 on 8 new connections in a row: each new connection
        may land on any worker, and every worker must have warmed up."""
        import httpx

        deadline, in_a_row = time.time() + timeout, 0
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-2000:]}")
            try:
                ready = httpx.get(f"http://127.0.0.1:{self.port}/readyz").status_code == 200
            except httpx.TransportError:
                ready = False
            in_a_row = in_a_row + 1 if ready else 0
            if in_a_row == 8:
                return
            if not ready:
                time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def run_load(image_dir: Path, port: int, level: int, warmup: float, duration: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--loadgen", str(image_dir), "--port",
                          str(port), "--level", str(level), "--warmup", str(warmup),
                          "--duration", str(duration)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    from service.allocator import tune_malloc
    from service.settings import DEFAULT_BUNDLE, Settings, available_cores

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset source (training's syntax)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--unbatched-concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=available_cores(),
                        help="torch threads of the model alone (default: every core)")
    parser.add_argument("--workers", default="auto",
                        help="OODSERVE_WORKERS (default: the service's default, auto)")
    parser.add_argument("--server-threads", type=int,
                        help="OODSERVE_TORCH_THREADS for each worker (default: the service's "
                             "own, the cores shared out between the workers)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    workers = Settings(_env_file=None, workers=args.workers).resolved_workers(
        cuda=torch.cuda.is_available())
    defaults = Settings(_env_file=None)
    max_batch = defaults.max_batch_size
    # The model alone gets the allocator settings the service's workers get (the server
    # inherits this environment, OODSERVE_TUNE_MALLOC included).
    malloc = "tuned" if defaults.tune_malloc and tune_malloc() else "default"
    images = read_images(args.data, args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, malloc {malloc}, "
          f"model alone on {args.threads} torch threads; service: {workers} worker(s) "
          f"(OODSERVE_WORKERS={args.workers}), "
          f"torch threads {args.server_threads or 'default'}; bundle {args.bundle}; "
          f"{len(images)} JPEGs "
          f"from {args.data}, mean {statistics.mean(map(len, images)):.0f} bytes")
    alone = ModelAlone(args.bundle, images, max_batch)

    def measure_model_alone() -> dict:
        raw = alone.measure(args.duration)
        print(f"{'model alone':22s}        single-image forward p50 {raw['single_ms']:.2f} ms; "
              f"batched (batch {max_batch}) {raw['batched_img_s']:.1f} img/s", flush=True)
        return raw

    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = Path(tmp) / "images"
        image_dir.mkdir()
        for i, data in enumerate(images):
            (image_dir / f"{i:05d}.jpg").write_bytes(data)
        off_level = args.unbatched_concurrency
        for label, batch, run_levels in [(f"batched (max {max_batch})", max_batch, levels),
                                         ("batching off (max 1)", 1, [off_level]),
                                         (f"batched again (max {max_batch})", max_batch,
                                          [off_level])]:
            server = Server(args.bundle, args.port, args.workers, args.server_threads,
                            batch, Path(tmp) / "log")
            try:
                server.wait_ready()
                # Only the first batched levels are compared with the model alone.
                raw = measure_model_alone() if label.startswith("batched (") else None
                for level in run_levels:
                    pid = server.proc.pid
                    cpu, stats = tree_cpu_seconds(pid), batching_stats(args.port)
                    result = run_load(image_dir, args.port, level, args.warmup, args.duration)
                    cpu = tree_cpu_seconds(pid) - cpu
                    passes, served, busy = (b - a for a, b in
                                            zip(stats, batching_stats(args.port)))
                    rows.append({"service": label, **result, **tree_memory_kib(pid),
                                 "cpu_ms_per_request": cpu / result["all_requests"] * 1000,
                                 "mean_batch": served / passes,
                                 "inference_busy": busy / (args.warmup + args.duration)
                                 / workers})
                    r = rows[-1]
                    print(f"{label:22s} c={level:3d}: {r['rps']:7.1f} req/s  p50 "
                          f"{r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  p99 "
                          f"{r['p99_ms']:6.1f} ms  errors {r['errors']}  "
                          f"PSS {r['pss_kib'] / 1024:.0f} MiB in {r['processes']} processes "
                          f"(RSS peak {r['rss_peak_kib'] / 1024:.0f})  "
                          f"server CPU {r['cpu_ms_per_request']:.2f} ms/req  mean batch "
                          f"{r['mean_batch']:.1f}  inference busy {r['inference_busy']:.0%}",
                          flush=True)
                    if raw is not None:
                        after = measure_model_alone()
                        r["alone"] = {key: (raw[key] + after[key]) / 2 for key in raw}
                        raw = after
            finally:
                server.stop()

    def row(service: str, level: int) -> dict | None:
        return next((r for r in rows if r["service"].startswith(service)
                     and r["concurrency"] == level), None)

    print("targets:")
    c32, c1 = row("batched (", 32), row("batched (", 1)
    off, on_before, on_after = (row("batching off", off_level), row("batched (", off_level),
                                row("batched again", off_level))
    if c32:
        alone_img_s = c32["alone"]["batched_img_s"]
        share = c32["rps"] / alone_img_s
        print(f"  c=32 vs model alone batched ({alone_img_s:.1f} img/s, mean of the readings "
              f"just before and after c=32): {share:.1%} (target >= 60%): "
              f"{'met' if share >= 0.6 else 'NOT met'}")
    if off and on_before and on_after:
        batched = (on_before["rps"] + on_after["rps"]) / 2
        gain = batched / off["rps"]
        print(f"  c={off_level} batched ({batched:.1f} req/s, mean of its readings before "
              f"and after batching off) vs batching off ({off['rps']:.1f} req/s): "
              f"{gain:.2f}x (target >= 2x): {'met' if gain >= 2 else 'NOT met'}")
    if c1:
        budget = c1["alone"]["single_ms"] + 5
        print(f"  c=1 p50 {c1['p50_ms']:.2f} ms vs single forward + 5 ms = {budget:.2f} ms: "
              f"{'met' if c1['p50_ms'] <= budget else 'NOT met'}")
    memory = max(r["pss_kib"] for r in rows) / 1024
    print(f"  memory (largest PSS sum over the service's processes) {memory:.0f} MiB "
          f"(target <= 1024 MiB): {'met' if memory <= 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()
