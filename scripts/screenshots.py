"""Take the monitoring guide's Flower screenshot (docs/img/flower-deferred-task.png) with headless Chromium.

Starts a redis-server, a prefork worker of ``tests.integration.partner_proj`` and a real
Flower on loopback ports, takes the partner down so the breaker opens and tasks are
deferred, then captures Flower's page of a deferred task: RETRY, with the reason in its
Exception. (``scripts/capture_watch.py`` captures ``celery breaker watch``.)

Run ``.venv/bin/python scripts/screenshots.py`` from the project root (needs
``chromium``: ``apt-get install -y chromium``). Not part of the test suite: the
picture is committed, and tests/integration/test_flower.py checks what it shows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration import partner_proj  # noqa: E402
from tests.integration.partner_proj import BREAKER, call_partner, down_key  # noqa: E402
from tests.integration.workers import WorkerProcess, flower, wait_for  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

from celery_breaker import CircuitBreaker  # noqa: E402

IMG = ROOT / "docs" / "img"
POLICY = {"failure_threshold": 2, "reset_timeout": 20.0, "half_open_max_calls": 1}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("screenshots: no chromium found (apt-get install -y chromium)")


def shoot(url: str, out: Path, size: str = "1280,900") -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={size}", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    print(f"wrote {out.relative_to(ROOT)}")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    ns = f"shots-{uuid.uuid4().hex[:6]}"
    with RedisServer() as server:
        server.start()
        broker, store_url = f"{server.url}/0", f"{server.url}/1?key_prefix={ns}"
        partner_proj.app.conf.update(broker_url=broker, result_backend=broker)
        conf = {"breaker_storage_url": store_url, "breaker_default_policy": POLICY}
        observer = CircuitBreaker(BREAKER, POLICY, storage=store_url)
        config = f"from celery_breaker.monitoring.flower import register_breakers\nregister_breakers({store_url!r})\n"
        with (
            flower(broker, config) as web,
            WorkerProcess(broker, concurrency=2, extra_conf=json.dumps(conf), name="web-1",
                          app="tests.integration.partner_proj") as worker,
        ):  # fmt: skip
            worker.wait_ready()
            redis_client = server.admin()
            redis_client.select(0)
            redis_client.set(down_key(ns), 1)
            results = [call_partner.delay(ns, n) for n in range(12)]
            wait_for(lambda: observer.snapshot().deferrals >= 8, 60, "deferrals")

            def deferred_id() -> str | None:
                for result in results:
                    info = web.json(f"/api/task/info/{result.id}")
                    if info.get("state") == "RETRY" and "CircuitOpenError" in (info.get("exception") or ""):
                        return str(result.id)
                return None

            wait_for(lambda: deferred_id() is not None, 30, "a deferred task in flower")
            shoot(f"http://127.0.0.1:{web.port}/task/{deferred_id()}", IMG / "flower-deferred-task.png", "1280,1100")

            redis_client.delete(down_key(ns))
            observer.close()
            results.clear()  # (their result subscriptions end while Redis is still up)


if __name__ == "__main__":
    main()
