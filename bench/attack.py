"""The two load attacks of issue 18, against the real service: a decode-heavy attack next to a
well-behaved client, and an overload far beyond what the machine can score.

    python bench/attack.py [--bundle DIR] [--scenario attack|overload|both] [--json OUT]

Each scenario starts its own ``python -m service`` (bench/serve.py's :class:`Server`: the
service's defaults, ``OODSERVE_*`` from this environment applied, ``--workers`` overrides)
on a free port, waits until every worker is ready, and stops it with SIGTERM afterwards.

1. **attack**: ``--attack-concurrency`` connections (default 4) each send ``POST
   /predict/batch`` with ``--attack-images`` (default 64) all-zero PNGs as large as the
   per-image pixel limit allows (``OODSERVE_MAX_IMAGE_PIXELS``, 5000x5000 by default: a
   few tens of KB each, since zeros compress), one request after the other for
   ``--duration`` seconds. Meanwhile a probe client sends one real image (CIFAR-10 test
   JPEGs, or generated ones with ``--synthetic``) at a time to ``POST /predict``, each on a
   new connection, so that it lands on whichever worker the kernel picks, as a new client
   would. The probe also runs alone for ``--baseline`` seconds first. Reported: the probe's
   p50/p99/max latency and statuses, alone and under attack; the attack requests'
   statuses and latencies; the resident memory (VmRSS) summed over the service's
   processes (supervisor, fork server, workers) just before the attack, its peak (sampled
   every 0.25 s) and ``--settle`` seconds after the last attack request was answered.
   The issue's bars: probe p99 <= 1 s, memory after <= 1.1 x before.
2. **overload**: ``--concurrency`` clients (default 2,500), one keep-alive connection each,
   each sending ``POST /predict`` with one small real image as soon as its previous answer
   arrives (closed loop; ``Retry-After`` is not honoured, as an attacker would not), for
   ``--overload-duration`` seconds; the requests then in flight are waited for. A request
   is lost when no HTTP answer arrives: a failed connect or write, a connection closed
   without a whole response, no answer within ``--timeout`` seconds. The images the
   service scored are read from its ``/metrics`` (``oodserve_predictions_total``, over all
   workers) before and after; scored minus images answered 200 is what was scored for
   requests that were refused or lost. The issue's bars: nothing lost, p99 of the 200
   answers <= 3 s, nothing scored beyond the 200 answers.

The clients run in this process on raw asyncio streams with pre-encoded requests (the
helpers of bench/soak.py), on the same machine as the service, as in the issue's run; their
CPU time is reported next to the service's. The file-descriptor limit is raised to fit the
overload's connections. Like bench/serve.py, the script reports the figures and prints
PASS/FAIL against each bar, and exits 0 whatever they are; only a crash (the service not
starting, not stopping on SIGTERM) exits otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import math
import os
import resource
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from serve import Server, process_tree, tree_cpu_seconds
from soak import (
    DEFAULT_DATA,
    REQUEST_TIMEOUT,
    Answer,
    good_images,
    memory_kib,
    multipart,
    percentile,
    raw_request,
    read_response,
)

HOST = "127.0.0.1"
FAILURES = (Answer, ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError)
PROBE_P99_S = 1.0
RSS_RETURN = 1.10
ADMITTED_P99_S = 3.0


# -- measurements ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over ``pid`` and its descendants (a worker may be gone mid-read)."""
    total = 0
    for p in process_tree(pid):
        try:
            total += memory_kib(p)
        except (FileNotFoundError, ProcessLookupError, RuntimeError):
            pass
    return total


def scored_images(port: int) -> float:
    """``oodserve_predictions_total`` summed over models, versions and workers."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "oodserve_predictions_total")


async def settled_count(port: int, quiet_s: float = 2.0, limit_s: float = 60.0) -> float:
    """:func:`scored_images` once it has stopped moving for ``quiet_s`` (at most ``limit_s``):
    images admitted for requests whose clients gave up are still scored after the last
    answer, and must be counted too."""
    last, since, deadline = scored_images(port), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = scored_images(port)
        if now != last:
            last, since = now, time.monotonic()
    return last


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.machine()


def latency_summary(latencies: list[float]) -> dict:
    values = sorted(latencies)
    return {"count": len(values), "p50_ms": percentile(values, 0.50) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": values[-1] * 1000 if values else float("nan")}


def zero_png(side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, "PNG")
    return out.getvalue()


# -- clients ---------------------------------------------------------------------------

async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
        try:
            await writer.wait_closed()
        except FAILURES:
            pass


async def _exchange(port: int, request: bytes, timeout: float,
                    conn: list) -> tuple[int, bool, bytes]:
    """Send ``request`` on ``conn`` ([reader, writer], opened if empty) and read the
    answer: (status, whether the server closes the connection, body)."""
    if not conn:
        conn.extend(await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout))
    reader, writer = conn
    writer.write(request)
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass  # refused early and closed before the whole body went out: read the answer
    return await asyncio.wait_for(read_response(reader), timeout)


class Log:
    """Each request's (time sent, latency, status or why no answer came), the first answer
    body of each status other than 200 (the service's reason for it), and the outcome of
    each image of the batch requests answered 200 (scored, or its error code)."""

    def __init__(self):
        self.entries: list[tuple[float, float, int | str]] = []
        self.examples: dict[str, str] = {}
        self.failures: list[str] = []
        self.images: Counter = Counter()

    def answer(self, t0: float, status: int, body: bytes) -> None:
        self.entries.append((t0, time.perf_counter() - t0, status))
        if status != 200:
            self.examples.setdefault(str(status), body[:300].decode("utf-8", "replace"))
        elif b'"results"' in body:
            for entry in json.loads(body)["results"]:
                error = entry.get("error")
                self.images["scored" if error is None else
                            error.get("code", "error") if isinstance(error, dict) else
                            str(error)] += 1

    def no_answer(self, t0: float, exc: BaseException) -> None:
        self.entries.append((t0, time.perf_counter() - t0, f"no answer ({type(exc).__name__})"))
        if len(self.failures) < 20:
            self.failures.append(repr(exc))

    def latencies(self, status: int | None = None) -> list[float]:
        return [t for _, t, s in self.entries if status is None or s == status]

    def statuses(self) -> dict[str, int]:
        counts = Counter(str(s) for _, _, s in self.entries)
        return {k: counts[k] for k in sorted(counts)}


async def probe(port: int, requests: list[bytes], stop: asyncio.Event, timeout: float,
                log: Log) -> None:
    """One request at a time, each on a new connection, until ``stop``."""
    i = 0
    while not stop.is_set():
        conn: list = []
        t0 = time.perf_counter()
        try:
            status, _, body = await _exchange(port, requests[i % len(requests)], timeout, conn)
            log.answer(t0, status, body)
        except FAILURES as exc:
            log.no_answer(t0, exc)
        await _close(conn[1] if conn else None)
        i += 1


async def sample_rss(pid: int, stop: asyncio.Event, samples: list[int]) -> None:
    while not stop.is_set():
        samples.append(tree_rss_kib(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def keep_sending(port: int, request: bytes, end: float, timeout: float, log: Log,
                       retry_pause: float = 0.0) -> None:
    """Closed loop on one keep-alive connection (reopened when the server closes it or it
    fails) until ``end``."""
    conn: list = []
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            status, closes, body = await _exchange(port, request, timeout, conn)
        except FAILURES as exc:
            log.no_answer(t0, exc)
            await _close(conn[1] if conn else None)
            conn = []
            await asyncio.sleep(retry_pause)
            continue
        log.answer(t0, status, body)
        if closes:
            await _close(conn[1])
            conn = []
    await _close(conn[1] if conn else None)


# -- scenarios -------------------------------------------------------------------------

def _summary(log: Log) -> dict:
    return {**latency_summary(log.latencies()), "ok_latency": latency_summary(log.latencies(200)),
            "statuses": log.statuses(),
            "answer_examples": log.examples, "failure_examples": log.failures,
            "images_in_200_answers": dict(log.images)}


async def _attack(server: Server, args: argparse.Namespace, probe_requests: list[bytes],
                  attack_request: bytes) -> dict:
    port, pid = server.port, server.proc.pid
    alone, under, attack = Log(), Log(), Log()
    stop = asyncio.Event()
    task = asyncio.create_task(probe(port, probe_requests, stop, args.timeout, alone))
    await asyncio.sleep(args.baseline)
    stop.set()
    await task

    rss_before = tree_rss_kib(pid)
    stop, done = asyncio.Event(), asyncio.Event()
    samples = [rss_before]
    sampler = asyncio.create_task(sample_rss(pid, done, samples))
    prober = asyncio.create_task(probe(port, probe_requests, stop, args.timeout, under))
    cpu, started = tree_cpu_seconds(pid), time.perf_counter()
    end = started + args.duration
    await asyncio.gather(*(keep_sending(port, attack_request, end, args.timeout, attack)
                           for _ in range(args.attack_concurrency)))
    attack_s = time.perf_counter() - started
    cpu = tree_cpu_seconds(pid) - cpu
    stop.set()
    await prober
    done.set()
    await sampler
    await asyncio.sleep(args.settle)
    rss_after = tree_rss_kib(pid)
    return {
        "attack": _summary(attack), "attack_s": attack_s, "server_cpu_s": cpu,
        "probe_alone": _summary(alone), "probe_under_attack": _summary(under),
        "rss_before_mib": rss_before / 1024, "rss_peak_mib": max(samples) / 1024,
        "rss_after_mib": rss_after / 1024, "rss_after_ratio": rss_after / rss_before,
        "processes": len(process_tree(pid)),
    }


def _windows(entries: list[tuple[float, float, int | str]], started: float, width: float,
             duration: float) -> list[dict]:
    """By the time each request was sent: how many, their outcomes, the 200s' latency."""
    rows = []
    for w in range(math.ceil(duration / width)):
        lo, hi = w * width, min((w + 1) * width, duration)
        rows_in = [(t, s) for t0, t, s in entries if lo <= t0 - started < hi]
        ok = [t for t, s in rows_in if s == 200]
        rows.append({"from_s": lo, "to_s": hi, "sent": len(rows_in), "ok": len(ok),
                     "refused": sum(1 for _, s in rows_in if s == 503),
                     "lost": sum(1 for _, s in rows_in if isinstance(s, str)),
                     **{f"ok_{k}": v for k, v in latency_summary(ok).items() if k != "count"}})
    return rows


async def _overload(server: Server, args: argparse.Namespace, requests: list[bytes]) -> dict:
    port, pid = server.port, server.proc.pid
    scored = scored_images(port)
    log = Log()
    cpu, own = tree_cpu_seconds(pid), time.process_time()
    started = time.perf_counter()
    end = started + args.overload_duration
    # A client whose connect fails waits a little before the next try, so that a refused
    # connect is not repeated in a tight loop that starves the other clients.
    await asyncio.gather(*(keep_sending(port, requests[k % len(requests)], end, args.timeout,
                                        log, retry_pause=0.1)
                           for k in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    cpu, own = tree_cpu_seconds(pid) - cpu, time.process_time() - own
    scored = await settled_count(port) - scored
    ok = log.latencies(200)
    lost = sum(1 for _, _, s in log.entries if isinstance(s, str))
    return {
        "sent": len(log.entries), "answered": len(log.entries) - lost, "lost": lost,
        "statuses": log.statuses(), "answer_examples": log.examples,
        "failure_examples": log.failures,
        "admitted_latency": latency_summary(ok),
        "refused_latency": latency_summary(log.latencies(503)),
        "windows": _windows(log.entries, started, args.window, args.overload_duration),
        "elapsed_s": elapsed, "answered_200_per_s": len(ok) / elapsed,
        "images_scored": scored, "images_answered_200": len(ok),
        "scored_beyond_200": scored - len(ok),
        "server_cpu_s": cpu, "client_cpu_s": own, "processes": len(process_tree(pid)),
    }


def run_scenario(name: str, args: argparse.Namespace, work, *inputs) -> dict:
    server = Server(args.bundle, args.port, args.workers, None, args.tmp / f"{name}.log")
    try:
        server.wait_ready()
        result = asyncio.run(work(server, args, *inputs))
    finally:
        server.stop()
    log = server.log.read_text()
    result.update(exit_code=server.proc.returncode,
                  server_log_errors=[line for line in log.splitlines()
                                     if "ERROR" in line or "Traceback" in line][:20])
    return result


# -- report ----------------------------------------------------------------------------

def _ms(summary: dict) -> str:
    return (f"{summary['count']:7d} {summary['p50_ms']:9.1f} {summary['p99_ms']:9.1f} "
            f"{summary['max_ms']:9.1f}")


def _print_examples(r: dict, who: str) -> None:
    for status, body in r["answer_examples"].items():
        print(f"  {who}: first {status} answer: {body}")
    for example in r["failure_examples"][:5]:
        print(f"  {who}: no answer: {example}")


def print_attack(r: dict, args: argparse.Namespace) -> dict[str, bool]:
    print(f"\nattack: {args.attack_concurrency} x /predict/batch of {args.attack_images} "
          f"all-zero {args.attack_side}x{args.attack_side} PNGs ({r['attack_body_bytes']:,} "
          f"bytes a request) for {args.duration:.0f} s ({r['attack_s']:.1f} s until the "
          f"last answer); {r['processes']} server processes")
    print(f"{'':26s} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}  statuses")
    print(f"{'probe alone':26s} {_ms(r['probe_alone'])}  {r['probe_alone']['statuses']}")
    print(f"{'probe under attack':26s} {_ms(r['probe_under_attack'])}  "
          f"{r['probe_under_attack']['statuses']}")
    print(f"{'  of which answered 200':26s} {_ms(r['probe_under_attack']['ok_latency'])}")
    print(f"{'attack requests':26s} {_ms(r['attack'])}  {r['attack']['statuses']}")
    _print_examples(r["probe_under_attack"], "probe")
    _print_examples(r["attack"], "attack")
    if r["attack"]["images_in_200_answers"]:
        print(f"  attack: images of the batch requests answered 200: "
              f"{r['attack']['images_in_200_answers']}")
    print(f"server RSS (sum over its processes): before {r['rss_before_mib']:.1f} MiB, peak "
          f"{r['rss_peak_mib']:.1f} MiB, {args.settle:.0f} s after {r['rss_after_mib']:.1f} "
          f"MiB (x{r['rss_after_ratio']:.3f}); server CPU during the attack "
          f"{r['server_cpu_s']:.1f} s")
    probe = r["probe_under_attack"]
    return {
        f"attack: probe p99 <= {PROBE_P99_S:g} s": probe["count"] > 0
        and probe["p99_ms"] <= PROBE_P99_S * 1000,
        f"attack: probe p99 of its 200 answers <= {PROBE_P99_S:g} s":
        probe["ok_latency"]["count"] > 0
        and probe["ok_latency"]["p99_ms"] <= PROBE_P99_S * 1000,
        "attack: every probe request answered 200": set(probe["statuses"]) == {"200"},
        f"attack: RSS after <= {RSS_RETURN:g} x before": r["rss_after_ratio"] <= RSS_RETURN,
    }


def print_overload(r: dict, args: argparse.Namespace) -> dict[str, bool]:
    print(f"\noverload: {args.concurrency} clients for {args.overload_duration:.0f} s "
          f"({r['elapsed_s']:.1f} s until the last answer); {r['processes']} server processes")
    print(f"requests: sent {r['sent']}, answered {r['answered']}, lost {r['lost']}; "
          f"statuses {r['statuses']}")
    print(f"{'':26s} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    print(f"{'admitted (200)':26s} {_ms(r['admitted_latency'])}")
    print(f"{'refused (503)':26s} {_ms(r['refused_latency'])}")
    print(f"by the time sent: {'window':>13} {'sent':>7} {'200':>6} {'503':>7} {'lost':>5} "
          f"{'200 p50 ms':>11} {'200 p99 ms':>11}")
    for w in r["windows"]:
        print(f"{'':17s} {w['from_s']:5.0f}-{w['to_s']:5.0f} s {w['sent']:7d} {w['ok']:6d} "
              f"{w['refused']:7d} {w['lost']:5d} {w['ok_p50_ms']:11.1f} {w['ok_p99_ms']:11.1f}")
    print(f"200 answers {r['answered_200_per_s']:.1f}/s; images scored {r['images_scored']:.0f} "
          f"vs answered 200 {r['images_answered_200']}: {r['scored_beyond_200']:.0f} scored "
          f"for requests not answered 200; CPU: server {r['server_cpu_s']:.1f} s, clients "
          f"{r['client_cpu_s']:.1f} s")
    _print_examples(r, "overload")
    return {
        "overload: zero lost": r["lost"] == 0,
        f"overload: p99 of admitted <= {ADMITTED_P99_S:g} s":
            r["admitted_latency"]["count"] > 0
            and r["admitted_latency"]["p99_ms"] <= ADMITTED_P99_S * 1000,
        "overload: no image scored for a refused request": r["scored_beyond_200"] == 0,
    }


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """The soft limit raised to ``needed`` (at most the hard limit); (before, after). The
    service inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft if soft >= needed else min(needed, hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, target


def main() -> None:
    from service.settings import DEFAULT_BUNDLE, Settings

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--scenario", choices=("attack", "overload", "both"), default="both")
    parser.add_argument("--workers", help="OODSERVE_WORKERS (default: the service's default)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of attack")
    parser.add_argument("--baseline", type=float, default=5.0,
                        help="seconds the probe runs alone before the attack")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the attack before memory is read again")
    parser.add_argument("--attack-concurrency", type=int, default=4)
    parser.add_argument("--attack-images", type=int, default=64)
    parser.add_argument("--attack-side", type=int,
                        help="PNG width and height (default: the largest square within "
                             "OODSERVE_MAX_IMAGE_PIXELS)")
    parser.add_argument("--concurrency", type=int, default=2500, help="overload clients")
    parser.add_argument("--overload-duration", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=5.0,
                        help="seconds per row of the overload's table")
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                        help="seconds without an answer after which a request is lost")
    parser.add_argument("--data", default=DEFAULT_DATA, help="probe and overload images")
    parser.add_argument("--synthetic", action="store_true",
                        help="generated images instead of --data")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()

    settings = Settings(bundle=args.bundle)  # the environment's OODSERVE_*, as the service's
    args.attack_side = args.attack_side or math.isqrt(settings.max_image_pixels)
    fd_before, fd_after = raise_fd_limit(2 * args.concurrency + 1024)
    images, source = good_images(None if args.synthetic else args.data, args.images)
    args.port = args.port or free_port()  # both scenarios' services, one after the other
    singles = [raw_request(args.port, "/predict", *multipart([("image", image)]))
               for image in images]
    png = zero_png(args.attack_side)
    attack_request = raw_request(args.port, "/predict/batch",
                                 *multipart([("images", png)] * args.attack_images))
    load = os.getloadavg()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_start": list(load), "bundle": str(args.bundle),
        "workers_setting": args.workers or str(settings.workers), "images": source,
        "fd_limit": [fd_before, fd_after],
    }
    print(f"attack bench {report['date']}: {report['machine']}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; bundle {args.bundle}; workers "
          f"{report['workers_setting']}; images: {source}; fd limit {fd_before} -> {fd_after}",
          flush=True)
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="oodserve-attack-") as tmp:
        args.tmp = Path(tmp)
        if args.scenario in ("attack", "both"):
            result = run_scenario("attack", args, _attack, singles, attack_request)
            result.update(attack_body_bytes=len(attack_request), png_bytes=len(png),
                          duration_s=args.duration, concurrency=args.attack_concurrency,
                          images_per_request=args.attack_images, side=args.attack_side)
            report["attack"] = result
            checks.update(print_attack(result, args))
        if args.scenario in ("overload", "both"):
            result = run_scenario("overload", args, _overload, singles)
            result.update(duration_s=args.overload_duration, concurrency=args.concurrency)
            report["overload"] = result
            checks.update(print_overload(result, args))
    report["load_average_end"] = list(os.getloadavg())
    report["checks"] = checks
    print(f"\nload average at the end {report['load_average_end'][0]:.2f}")
    for scenario in ("attack", "overload"):
        for line in report.get(scenario, {}).get("server_log_errors", [])[:5]:
            print(f"  {scenario} server log: {line}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
