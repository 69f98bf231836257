"""localsbx benchmarks: ``make bench`` (or ``python -m bench.run [--runs N]``).

Prints, on this machine:

* cold boot → first command, p50 of N (a sandbox booted from the image's disk);
* ``new`` → first command from the snapshot, p50 of N (``Sandbox.create`` + ``run``);
* their ratio (target under TCG: restore ≤ 1.0 s p50, ratio ≤ 0.25);
* the snapshot's state file and RAM file sizes (apparent and allocated);
* RSS and PSS per idle restored sandbox with four alive (target PSS ≤ 100 MiB);
* the same via the CLI (``localsbx new`` + ``localsbx exec``), wall time including Python
  start-up;
* the control plane (:mod:`bench.control`): each figure beside its raw reference;
* the build step cache (:mod:`bench.stepcache`): no-op rebuild, ten steps with the last
  one changed against the cold build, each beside its raw reference;
* every built base (:mod:`bench.bases`): cold boot → first command and restore → first
  command, each beside a bare QEMU reference, and the first and the cached pull of a
  registry image beside ``skopeo``; ``--bases`` runs this section alone, ``--skip-bases``
  leaves it out.

Targets are printed beside the figures; nothing here fails a build (the machines are shared
and noisy). Results are also written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from localsbx import Sandbox, store
from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile

HERE = Path(__file__).parent
IMAGE_DIR = HERE / "image"
IMAGE = "bench-image"
MiB = 1024 * 1024


def p50(xs):
    return statistics.median(xs)


def fmt(xs):
    return f"p50 {p50(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def ensure_image():
    d = parse_dockerfile(IMAGE_DIR / "Dockerfile", name=IMAGE)
    build_image(d, context_dir=IMAGE_DIR, name=IMAGE)
    return store.lookup_image(IMAGE)


def time_to_first_command(cold: bool) -> float:
    t = time.monotonic()
    sb = Sandbox.create(IMAGE, cold_boot=cold)
    try:
        r = sb.run("true")
        assert r.exit_code == 0
        return time.monotonic() - t
    finally:
        sb.terminate()


def mem_of(pid: int) -> tuple[float, float]:
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss / 1024, pss / 1024


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def cli_times(n: int) -> list[float]:
    out = []
    exe = Path(sys.executable).with_name("localsbx")
    for _ in range(n):
        t = time.monotonic()
        sid = subprocess.run([str(exe), "new", "--image", IMAGE], capture_output=True,
                             text=True, check=True).stdout.strip()
        subprocess.run([str(exe), "exec", sid, "--", "true"], check=True)
        out.append(time.monotonic() - t)
        subprocess.run([str(exe), "terminate", sid], capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-plugin", action="store_true", help="skip the pytest-plugin suite")
    ap.add_argument("--idle", type=int, default=100,
                    help="idle sandboxes alive at once in the control-plane bench (0: skip)")
    ap.add_argument("--bases", action="store_true",
                    help="only the per-base and registry-pull figures (bench.bases)")
    ap.add_argument("--skip-bases", action="store_true", help="leave out bench.bases")
    ap.add_argument("--bases-runs", type=int, default=2,
                    help="runs per boot figure in bench.bases (TCG: 1-2 keeps it bounded)")
    args = ap.parse_args()
    os.environ.setdefault("LOCALSBX_PROJECT", "bench")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    if args.bases:
        from bench import bases

        res = bases.run(args.bases_runs)
        (out / "bases.json").write_text(json.dumps(res, indent=2, default=str))
        return
    img = ensure_image()
    results: dict = {"runs": args.runs, "host": os.uname().nodename}
    print(f"== localsbx bench ({(img.meta.accel or '?').upper()}, image {IMAGE}, "
          f"{args.runs} runs each, interleaved)")
    time_to_first_command(False)  # warm host page cache for the image files
    cold, warm = [], []
    for _ in range(args.runs):
        cold.append(time_to_first_command(True))
        warm.append(time_to_first_command(False))
    ratio = p50(warm) / p50(cold)
    print(f"cold boot -> first command     {fmt(cold)}")
    print(f"new (restore) -> first command {fmt(warm)}   target <= 1.00 s")
    print(f"ratio restore/cold             {ratio:.3f}   target <= 0.25")
    results.update(cold_boot_s=cold, restore_s=warm, ratio=ratio)

    snap = img.path / "snap"
    sizes = {f: (os.path.getsize(snap / f), allocated(snap / f)) for f in ("state.mig", "ram", "disk.qcow2")}
    for f, (size, alloc) in sizes.items():
        print(f"snapshot {f:<12} {size / MiB:9.2f} MiB apparent, {alloc / MiB:8.2f} MiB allocated")
    results["sizes"] = sizes

    sbs = [Sandbox.create(IMAGE) for _ in range(4)]
    try:
        for sb in sbs:
            sb.run("true")
        time.sleep(3)
        mems = [mem_of(sb.record.qemu_pid) for sb in sbs]
    finally:
        for sb in sbs:
            sb.terminate()
    for i, (rss, pss) in enumerate(mems):
        print(f"idle restored sandbox {i}: RSS {rss:6.1f} MiB, PSS {pss:6.1f} MiB")
    print(f"PSS per sandbox (4 alive): mean {statistics.mean(p for _, p in mems):.1f} MiB   "
          "target <= 100 MiB")
    results["mem_mib"] = mems

    cli = cli_times(min(args.runs, 3))
    print(f"CLI `localsbx new` + `localsbx exec true` {fmt(cli)} (includes Python start-up)")
    results["cli_s"] = cli

    from bench import control

    results["control"] = control.run(IMAGE, args.runs, args.idle)

    from bench import serve

    results["serve"] = serve.run(IMAGE, args.runs)

    from bench import stepcache

    results["stepcache"] = stepcache.run(min(args.runs, 3))

    if not args.skip_bases:
        from bench import bases

        results["bases"] = bases.run(args.bases_runs)

    if not args.skip_plugin:
        from bench import plugin_suite

        results["plugin"] = plugin_suite.run(IMAGE)

    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
