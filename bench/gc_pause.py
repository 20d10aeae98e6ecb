"""How long a full garbage collection stops an API process, with and without gc.freeze().

    GENROUTE_REDIS_URL=redis://127.0.0.1:6379/0 python bench/gc_pause.py

Builds the app and runs its lifespan (runtime, catalog, pools, as `genroute api` does, over
a fresh SQLite data directory), answers one /healthz, then times `gc.collect()` with every
object start-up made visible to the collector (as before the API froze them) and again
with them frozen (api/app.py freeze_startup_heap). Prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time


def pauses(n: int = 7) -> dict[str, float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        gc.collect()
        out.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(out), 2), "max_ms": round(max(out), 2)}


def main() -> None:
    os.environ.setdefault("GENROUTE_SECRET_KEY", "bench")
    os.environ["GENROUTE_DATA_DIR"] = tempfile.mkdtemp(prefix="gc-pause-")
    os.environ.setdefault("GENROUTE_REDIS_PREFIX", f"gcpause{os.getpid()}")
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app()) as c:  # the lifespan runs: what a started API holds
        assert c.get("/healthz").status_code == 200
        gc.unfreeze()
        seen = len(gc.get_objects())
        unfrozen = pauses()
        gc.freeze()
        frozen = pauses()
        print(json.dumps({"objects_after_startup": seen, "full_gc_unfrozen": unfrozen,
                          "full_gc_frozen": frozen, "frozen_objects": gc.get_freeze_count(),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
