"""Throughput, latency and memory of the real service against the model alone, in one run.

    python bench/serve.py [--bundle DIR] [--workers N|auto] [--duration 5] [--concurrency 1,8,32,64]

1. Reads ``--images`` real JPEGs (default: CIFAR-10 test, ``../shared/data/cifar10.tar.gz``).
2. Model alone, no HTTP, in this process, on the device the service will use
   (``OODSERVE_DEVICE``, ``OODSERVE_PRECISION``; CUDA graphs as the service captures them):
   median latency of one image through :class:`service.inference.Predictor` (host tensor in,
   score rows back on the host) and the throughput of batched passes at each
   ``--alone-batches`` size; on CUDA also the graph replay alone, the batch already on the
   device. Measured before the first concurrency level and after each (the service started
   but idle), and each level is compared with the mean of the readings around it: on a
   shared machine the model alone's speed drifts by tens of percent within minutes.
3. Starts ``python -m service`` with its defaults (``--workers`` overrides
   ``OODSERVE_WORKERS``) and, from ``--loadgen-processes`` load-generator processes, keeps C
   requests in flight (closed loop: each of C keep-alive connections sends the next
   ``POST /predict`` when the last answer arrives) for each concurrency C; then
   ``POST /predict/batch`` requests of ``--batch-images`` images at ``--batch-concurrency``.
   On the CPU, the same service with batching off (max batch 1) at
   ``--unbatched-concurrency``, and the batched service once more at that concurrency,
   compared with the mean of the batched readings before and after it.
4. Prints req/s, p50/p95/p99 latency, errors, the service's host memory (PSS) and GPU
   memory, the CPU time per request of all its processes, the mean batch size and the share
   of wall time the inference threads spent in forward passes, and the targets: on the CPU,
   at concurrency 32 >= 60% of the model alone's batched throughput and >= 2x the unbatched
   service, c=1 p50 <= single forward + 5 ms, memory <= 1 GiB; on CUDA, c=256 >= 10,000
   req/s, c=1 p50 <= 3 ms, ``/predict/batch`` >= 40,000 images/s, host memory <= 4 GiB, the
   model alone >= 40,000 img/s at batch 32 and >= 120,000 at batch 256; zero errors.

Host memory is the sum of the proportional set size (PSS) of the service's processes: each
process's private pages plus its share of the pages it shares (the libraries that every
worker maps, the engine layout's shared image slots), so that N workers are not counted as N
full copies of torch's code. The largest RSS peak of any process is printed too. GPU memory
is what ``nvidia-smi`` reports for the service's processes.

The load generators speak HTTP/1.1 over raw asyncio streams with pre-encoded requests, so
that they cost as little CPU as possible; they still share the machine with the server, as
any client on the same host would.
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


# -- load generator (runs in its own processes) ----------------------------------------

def _request(host: str, port: int, images: list[bytes]) -> bytes:
    """One pre-encoded request: ``/predict`` for one image, ``/predict/batch`` for more."""
    boundary = uuid.uuid4().hex
    field, path = ("image", "/predict") if len(images) == 1 else ("images", "/predict/batch")
    body = b"".join(
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
         f"filename=\"{i}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + b"\r\n"
        for i, image in enumerate(images)) + f"--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
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


async def _load(host: str, port: int, requests: list[bytes], clients: list[int],
                start_at: float, warmup: float, duration: float) -> dict:
    await asyncio.sleep(max(0.0, start_at - time.time()))  # all generators start together
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
            i += 7919  # a prime: connections walk the images in different orders
            total += 1
            if window[0] <= done <= window[1]:
                latencies.append(done - sent)
                errors += status != 200
        writer.close()

    await asyncio.gather(*(client(k) for k in clients))
    return {"latencies": latencies, "all_requests": total, "errors": errors}


def loadgen_main(args: argparse.Namespace) -> None:
    images = [p.read_bytes() for p in sorted(Path(args.loadgen).iterdir())]
    per = args.per_request
    requests = [_request("127.0.0.1", args.port, (images * 2)[i:i + per])
                for i in range(0, len(images), per)]
    clients = list(range(args.first_client, args.level, args.step))
    result = asyncio.run(_load("127.0.0.1", args.port, requests, clients, args.start_at,
                               args.warmup, args.duration))
    print(json.dumps(result))


def run_load(image_dir: Path, port: int, level: int, warmup: float, duration: float,
             processes: int, per_request: int = 1) -> dict:
    """Keep ``level`` requests in flight from ``processes`` generators; merged results."""
    processes = max(1, min(processes, level))
    start_at = time.time() + 1.0 + 0.1 * processes  # once every generator has started
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--loadgen", str(image_dir), "--port", str(port),
         "--level", str(level), "--first-client", str(k), "--step", str(processes),
         "--start-at", str(start_at), "--per-request", str(per_request),
         "--warmup", str(warmup), "--duration", str(duration)],
        stdout=subprocess.PIPE, text=True) for k in range(processes)]
    parts = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"load generator exited with {proc.returncode}")
        parts.append(json.loads(out))
    latencies = sorted(x for part in parts for x in part["latencies"])

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"concurrency": level, "per_request": per_request, "requests": len(latencies),
            "all_requests": sum(p["all_requests"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "rps": len(latencies) / duration, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99)}


# -- orchestration ---------------------------------------------------------------------

def read_images(source: str, count: int) -> list[bytes]:
    from training.data.sources import open_dataset

    dataset = open_dataset(source, labeled=True)
    step = max(1, len(dataset.samples) // count)
    return [path.read_bytes() for path, _ in dataset.samples[::step][:count]]


class ModelAlone:
    """The model with no HTTP, as the service runs it: median single-image latency and
    batched throughput of :class:`~service.inference.Predictor` on the service's device."""

    def __init__(self, settings, images: list[bytes], batches: list[int], threads: int):
        import io

        import torch
        from PIL import Image

        from service.inference import Predictor
        from training.bundle import load_bundle
        from training.data.folders import load_rgb

        bundle = load_bundle(settings.bundle)
        transform = bundle.manifest.preprocessing.eval_transform()
        x = torch.stack([transform(load_rgb(Image.open(io.BytesIO(b)))) for b in images])
        while len(x) < max(batches):
            x = torch.cat([x, x])
        self.predictor = Predictor(bundle, settings.device, settings.precision, max(batches),
                                   threads, settings.tune_malloc, settings.cuda_graphs)
        self.predictor.warm_up(sorted({1, *batches}))
        self.predictor.staging.copy_(x[:max(batches)])
        self.batches = batches

    def measure(self, duration: float) -> dict:
        import torch

        p, result = self.predictor, {}
        p.run(1)
        singles, end = [], time.perf_counter() + duration
        while time.perf_counter() < end:
            t = time.perf_counter()
            p.run(1)
            singles.append(time.perf_counter() - t)
        result["single_ms"] = statistics.median(singles) * 1000
        for n in self.batches:
            passes, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration / len(self.batches):
                p.run(n)
                passes += 1
            result[f"batch_{n}_img_s"] = passes * n / (time.perf_counter() - start)
            if n in p._graphs:  # the captured graph alone, its batch already on the device
                graph = p._graphs[n][0]
                torch.cuda.synchronize()
                passes, start = 0, time.perf_counter()
                while time.perf_counter() - start < duration / len(self.batches) / 2:
                    graph.replay()
                    passes += 1
                torch.cuda.synchronize()
                result[f"replay_{n}_img_s"] = passes * n / (time.perf_counter() - start)
        return result


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
    """``pid`` and its descendants (the supervisor, its workers, the engine)."""
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


def gpu_memory_mib(pids: list[int]) -> float | None:
    """GPU memory that ``nvidia-smi`` reports for ``pids``; None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], check=False,
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = {int(p): float(m) for p, m in
            (line.split(",") for line in out.strip().splitlines() if "," in line)}
    return sum(used.get(p, 0.0) for p in pids)


def tree_memory(pid: int) -> dict:
    """PSS summed over the tree, the largest RSS peak (VmHWM) of any one process, and the
    tree's GPU memory."""
    pids = process_tree(pid)
    return {"pss_kib": sum(_proc_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids),
            "rss_peak_kib": max(_proc_field(f"/proc/{p}/status", "VmHWM") for p in pids),
            "gpu_mib": gpu_memory_mib(pids), "processes": len(pids)}


class Server:
    def __init__(self, bundle: Path, port: int, workers: str | None, max_batch: int | None,
                 log: Path):
        env = dict(os.environ)  # OODSERVE_* set by the caller apply, these win
        env.update(OODSERVE_BUNDLE=str(bundle), OODSERVE_PORT=str(port),
                   OODSERVE_LOG_LEVEL="warning")
        if workers is not None:
            env["OODSERVE_WORKERS"] = workers
        if max_batch is not None:
            env["OODSERVE_MAX_BATCH_SIZE"] = str(max_batch)
        self.port, self.log = port, log
        with open(log, "w") as out:  # the child keeps its own handle
            self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        """Until /readyz answers 200 on 16 new connections in a row: each new connection
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
            if in_a_row == 16:
                return
            if not ready:
                time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def _print_alone(raw: dict, batches: list[int]) -> None:
    parts = [f"single-image p50 {raw['single_ms']:.2f} ms"]
    for n in batches:
        part = f"batch {n} {raw[f'batch_{n}_img_s']:.0f} img/s"
        if f"replay_{n}_img_s" in raw:
            part += f" (graph replay alone {raw[f'replay_{n}_img_s']:.0f})"
        parts.append(part)
    print(f"{'model alone':30s} " + "; ".join(parts), flush=True)


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
    parser.add_argument("--concurrency",
                        help="/predict levels (default: 1,8,32,64 on the CPU, 1,32,256 on CUDA)")
    parser.add_argument("--batch-images", type=int, default=64,
                        help="images per /predict/batch request")
    parser.add_argument("--batch-concurrency", type=int,
                        help="/predict/batch requests in flight (default: 4 on the CPU, 32 on "
                             "CUDA; 0: skip)")
    parser.add_argument("--unbatched-concurrency", type=int,
                        help="level of the batching-off comparison (default: 32 on the CPU, "
                             "0 = skipped, on CUDA)")
    parser.add_argument("--alone-batches",
                        help="batch sizes of the model alone (default: the service's max "
                             "batch; on CUDA 32,256,1024)")
    parser.add_argument("--threads", type=int, default=available_cores(),
                        help="torch threads of the model alone on the CPU (default: every core)")
    parser.add_argument("--workers", help="OODSERVE_WORKERS (default: the service's default)")
    parser.add_argument("--loadgen-processes", type=int,
                        help="load-generator processes (default: 1 up to 4 cores, else 4)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    for hidden in ("--level", "--first-client", "--step", "--per-request"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args)
        return

    import torch

    from training.runtime import select_device

    torch.set_num_threads(args.threads)
    settings = Settings(bundle=args.bundle)  # the environment's OODSERVE_*, as the service
    cuda = select_device(settings.device).type == "cuda"
    max_batch = settings.resolved_max_batch_size(cuda)
    layout = settings.resolved_layout(cuda)
    workers = Settings(workers=args.workers or settings.workers).resolved_workers(cuda)
    levels = [int(c) for c in (args.concurrency or ("1,32,256" if cuda else "1,8,32,64")
                               ).split(",")]
    batch_level = (args.batch_concurrency if args.batch_concurrency is not None
                   else 32 if cuda else 4)
    off_level = (args.unbatched_concurrency if args.unbatched_concurrency is not None
                 else 0 if cuda else 32)
    alone_batches = [int(b) for b in (args.alone_batches or ("32,256,1024" if cuda
                                                             else str(max_batch))).split(",")]
    loadgens = args.loadgen_processes or (1 if available_cores() <= 4 else 4)
    # The model alone gets the allocator settings the service's workers get (the server
    # inherits this environment, OODSERVE_TUNE_MALLOC included).
    malloc = "tuned" if not cuda and settings.tune_malloc and tune_malloc() else "default"
    images = read_images(args.data, args.images)
    gpu = f", {torch.cuda.get_device_name()}" if cuda else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
          f"{gpu}, torch {torch.__version__}, malloc {malloc}; service: {layout} layout, "
          f"{workers} worker(s) (OODSERVE_WORKERS={args.workers or settings.workers}), "
          f"{settings.device} -> {'cuda' if cuda else 'cpu'}, {settings.precision}, max batch "
          f"{max_batch}; bundle {args.bundle}; {len(images)} JPEGs from {args.data}, mean "
          f"{statistics.mean(map(len, images)):.0f} bytes; {loadgens} load generator(s)")
    alone = ModelAlone(settings, images, alone_batches, args.threads)
    alone_s = min(args.duration, 1.0) if cuda else args.duration

    def measure_model_alone() -> dict:
        raw = alone.measure(alone_s)
        _print_alone(raw, alone_batches)
        return raw

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = Path(tmp) / "images"
        image_dir.mkdir()
        for i, data in enumerate(images):
            (image_dir / f"{i:05d}.jpg").write_bytes(data)
        runs = [(f"batched (max {max_batch})", None, levels, batch_level)]
        if off_level:
            runs += [("batching off (max 1)", 1, [off_level], 0),
                     (f"batched again (max {max_batch})", None, [off_level], 0)]
        for label, batch, run_levels, batch_requests in runs:
            server = Server(args.bundle, args.port, args.workers, batch, Path(tmp) / "log")
            try:
                server.wait_ready()
                # Only the first batched levels are compared with the model alone.
                raw = measure_model_alone() if label.startswith("batched (") else None
                plan = [(level, 1) for level in run_levels]
                if batch_requests:
                    plan.append((batch_requests, args.batch_images))
                for level, per_request in plan:
                    pid = server.proc.pid
                    cpu, stats = tree_cpu_seconds(pid), batching_stats(args.port)
                    result = run_load(image_dir, args.port, level, args.warmup, args.duration,
                                      loadgens, per_request)
                    cpu = tree_cpu_seconds(pid) - cpu
                    passes, served, busy = (b - a for a, b in
                                            zip(stats, batching_stats(args.port)))
                    rows.append({"service": label, **result, **tree_memory(pid),
                                 "cpu_ms_per_image": cpu / result["all_requests"] / per_request
                                 * 1000,
                                 "mean_batch": served / passes,
                                 "inference_busy": busy / (args.warmup + args.duration)
                                 / (1 if layout == "engine" else workers)})
                    r = rows[-1]
                    what = (f"c={level:3d}" if per_request == 1 else
                            f"/predict/batch x{per_request} c={level}")
                    rate = (f"{r['rps']:8.1f} req/s" if per_request == 1 else
                            f"{r['rps'] * per_request:8.1f} img/s")
                    gpu_mem = (f", GPU {r['gpu_mib']:.0f} MiB" if r["gpu_mib"] is not None
                               else "")
                    print(f"{label:22s} {what}: {rate}  p50 {r['p50_ms']:6.1f} ms  p95 "
                          f"{r['p95_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors "
                          f"{r['errors']}  PSS {r['pss_kib'] / 1024:.0f} MiB in "
                          f"{r['processes']} processes (RSS peak "
                          f"{r['rss_peak_kib'] / 1024:.0f}){gpu_mem}  server CPU "
                          f"{r['cpu_ms_per_image']:.2f} ms/image  mean batch "
                          f"{r['mean_batch']:.1f}  inference busy {r['inference_busy']:.0%}",
                          flush=True)
                    if raw is not None and per_request == 1:
                        after = measure_model_alone()
                        r["alone"] = {key: (raw[key] + after[key]) / 2 for key in raw}
                        raw = after
            finally:
                server.stop()

    def row(service: str, level: int, per_request: int = 1) -> dict | None:
        return next((r for r in rows if r["service"].startswith(service)
                     and r["concurrency"] == level and r["per_request"] == per_request), None)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("targets:")
    errors = sum(r["errors"] for r in rows)
    memory = max(r["pss_kib"] for r in rows) / 1024
    c1 = row("batched (", 1)
    batch_row = row("batched (", batch_level, args.batch_images) if batch_level else None
    if cuda:
        c256 = row("batched (", 256)
        if c256:
            print(f"  c=256 {c256['rps']:.1f} req/s (target >= 10,000): "
                  f"{verdict(c256['rps'] >= 10_000)}")
        if c1:
            print(f"  c=1 p50 {c1['p50_ms']:.2f} ms (target <= 3 ms): "
                  f"{verdict(c1['p50_ms'] <= 3)}")
        if batch_row:
            rate = batch_row["rps"] * args.batch_images
            print(f"  /predict/batch {rate:.1f} img/s (target >= 40,000): "
                  f"{verdict(rate >= 40_000)}")
        reference = next(r["alone"] for r in rows if "alone" in r)
        for n, target in ((32, 40_000), (256, 120_000)):
            if f"batch_{n}_img_s" in reference:
                print(f"  model alone batch {n}: {reference[f'batch_{n}_img_s']:.0f} img/s "
                      f"(target >= {target:,}): "
                      f"{verdict(reference[f'batch_{n}_img_s'] >= target)}")
        print(f"  host memory (largest PSS sum) {memory:.0f} MiB (target <= 4096 MiB): "
              f"{verdict(memory <= 4096)}")
    else:
        c32 = row("batched (", 32)
        if c32:
            alone_img_s = c32["alone"][f"batch_{max_batch}_img_s"]
            share = c32["rps"] / alone_img_s
            print(f"  c=32 vs model alone batched ({alone_img_s:.1f} img/s, mean of the "
                  f"readings just before and after c=32): {share:.1%} (target >= 60%): "
                  f"{verdict(share >= 0.6)}")
        off, on_before, on_after = (row("batching off", off_level),
                                    row("batched (", off_level),
                                    row("batched again", off_level))
        if off and on_before and on_after:
            batched = (on_before["rps"] + on_after["rps"]) / 2
            gain = batched / off["rps"]
            print(f"  c={off_level} batched ({batched:.1f} req/s, mean of its readings "
                  f"before and after batching off) vs batching off ({off['rps']:.1f} req/s): "
                  f"{gain:.2f}x (target >= 2x): {verdict(gain >= 2)}")
        if c1:
            budget = c1["alone"]["single_ms"] + 5
            print(f"  c=1 p50 {c1['p50_ms']:.2f} ms vs single forward + 5 ms = {budget:.2f} "
                  f"ms: {verdict(c1['p50_ms'] <= budget)}")
        print(f"  memory (largest PSS sum over the service's processes) {memory:.0f} MiB "
              f"(target <= 1024 MiB): {verdict(memory <= 1024)}")
    print(f"  errors {errors} (target 0): {verdict(errors == 0)}")


if __name__ == "__main__":
    main()
