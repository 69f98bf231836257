"""``localsbx serve`` benchmarks (``make bench``; or ``python -m bench.serve [--runs N]``).

Each figure beside its reference, measured in the same run:

* the real Tensorlake SDK's ``Sandbox.create`` → first ``run`` through ``localsbx serve``,
  beside the in-process API's ``localsbx.Sandbox.create`` → first ``run`` (the same work
  without HTTP; target ratio ≤ 1.2);
* 20 concurrent SDK clients (threads, each with its own sandbox made through the SDK),
  each running 50 commands: none may fail; commands per second overall.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def p50(xs):
    return statistics.median(xs)


def fmt(xs):
    return f"p50 {p50(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(project: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "localsbx.cli", "serve", "--port", str(port),
                             "--project", project], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/openapi.json", timeout=2).read()
            return proc, url
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("localsbx serve did not start") from None
            time.sleep(0.2)


def run(image: str, runs: int, clients: int = 20, commands: int = 50) -> dict:
    project = os.environ.get("LOCALSBX_PROJECT", "bench")
    proc, url = start_server(project)
    os.environ.update(TENSORLAKE_API_URL=url, TENSORLAKE_API_KEY="bench",
                      INDEXIFY_NAMESPACE=project)
    from tensorlake.sandbox import Sandbox as SdkSandbox  # reads the env at import

    from localsbx import Sandbox

    def lib() -> float:
        t = time.monotonic()
        sb = Sandbox.create(image)
        sb.run("true")
        dt = time.monotonic() - t
        sb.terminate()
        return dt

    def sdk() -> float:
        t = time.monotonic()
        sb = SdkSandbox.create(image=image)
        sb.run("true")
        dt = time.monotonic() - t
        sb.terminate()
        return dt

    res: dict = {}
    try:
        print(f"== localsbx serve (image {image}, {runs} runs each, interleaved)")
        lib(), sdk()  # warm up
        a, b = [], []
        for _ in range(runs):
            a.append(lib())
            b.append(sdk())
        print(f"localsbx.Sandbox.create -> run (in-process) {fmt(a)}")
        print(f"SDK Sandbox.create -> run (over HTTP)       {fmt(b)}   ratio "
              f"{p50(b) / p50(a):.2f}   target <= 1.20")
        res.update(lib_create_run_s=a, sdk_create_run_s=b, ratio=p50(b) / p50(a))

        failures: list[str] = []
        done = [0]
        lock = threading.Lock()

        def client(n: int) -> None:
            try:
                sb = SdkSandbox.create(image=image)
            except Exception as exc:  # noqa: BLE001 - counted as failures
                with lock:
                    failures.append(f"client {n} create: {exc}")
                return
            try:
                for i in range(commands):
                    try:
                        r = sb.run("echo", [f"{n}-{i}"])
                        ok = r.exit_code == 0 and r.stdout == f"{n}-{i}"
                    except Exception as exc:  # noqa: BLE001 - counted as failures
                        ok, r = False, exc
                    with lock:
                        if ok:
                            done[0] += 1
                        else:
                            failures.append(f"client {n} command {i}: {r}")
            finally:
                sb.terminate()

        t = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t
        print(f"{clients} SDK clients x {commands} commands: {done[0]} ok, {len(failures)} failed,"
              f" {wall:.1f} s wall (with {clients} creates), {done[0] / wall:.1f} commands/s"
              "   target: none failed")
        for f in failures[:5]:
            print(f"  failure: {f}")
        res.update(concurrent_ok=done[0], concurrent_failed=len(failures),
                   concurrent_wall_s=wall)
    finally:
        proc.terminate()
        proc.wait(10)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default="debian-minimal")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--commands", type=int, default=50)
    args = ap.parse_args()
    os.environ.setdefault("LOCALSBX_PROJECT", "bench")
    run(args.image, args.runs, args.clients, args.commands)


if __name__ == "__main__":
    main()
