"""``python -m profiler.bench [overrides]``: how fast the CPU profiler measures, and how long a full
default grid would take.

It times a sample of the configured grid's points (each family in proportion, spread over sizes:
profiler.run.calibrate, the dry run's ETA), reports points per second, and extrapolates to the
whole grid. It also counts the points of the
default GPU grid for a large model (``python -m profiler.run hw=h100 model=llama2-70b``).
"""
from __future__ import annotations

import sys
import time

from profiler.config import compose


def main(argv: list[str]) -> None:
    import conf
    from profiler import grid
    from profiler.run import DEFAULT_TP, calibrate, resolve
    sample = 40
    rest = []
    for a in argv:
        if a.startswith("sample="):
            sample = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    cfg = compose(["hw=cpu", "model=tiny-llama", "profile.progress=false", *rest])
    setup = resolve(cfg)
    allpts = [(f, p) for f, pts in setup.points.items() for p in pts]
    t0 = time.perf_counter()
    cal = calibrate(setup, allpts, sample)
    wall = time.perf_counter() - t0
    timed = sum(k for k, _ in cal.values())
    print(f"hw={setup.hw.name} model={setup.model.name} tp={setup.tps} dtype={setup.dtype} "
          f"threads={setup.threads} repeats<={cfg.profile.repeats} max_s/point={cfg.profile.max_seconds_per_point}")
    print(f"measured {timed} grid points spread over sizes in {wall:.1f} s: {timed / wall:.2f} points/s")
    est = 0.0
    for family, pts in setup.points.items():
        if family in cal:
            k, mean = cal[family]
            est += mean * len(pts)
            print(f"  {family:12s} {len(pts):5d} points  {mean * 1e3:8.1f} ms/point (sampled {k})")
    print(f"full grid: {len(allpts)} points, estimated {est / 60:.1f} min at this rate")
    big = compose(["hw=h100", "model=llama2-70b"])
    model = conf.to_model(big.model)
    gpu_pts = grid.build(model, grid.tp_degrees(model, list(big.profile.tp), DEFAULT_TP),
                         grid.axes(big.profile, "cuda"), list(big.profile.families), 16)
    total = sum(map(len, gpu_pts.values()))
    print("default GPU grid for hw=h100 model=llama2-70b: "
          + ", ".join(f"{f}={len(p)}" for f, p in gpu_pts.items()) + f" points (total {total})")


if __name__ == "__main__":
    from conf import user_errors
    user_errors(lambda: main(sys.argv[1:]))
