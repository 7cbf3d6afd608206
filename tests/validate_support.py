"""Helpers for the validate scenarios: the command run as an operator runs it, a worker of
the memory sandbox app, and headless Chromium to look at the HTML report."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifeguard.demo.worker import CeleryWorker
from lifeguard.report import DATA_ELEMENT_ID
from tests.monitor_support import lifeguard

DJANGO_APP = "lifeguard.demo.project.celery_app"
DJANGO_TASKS = "lifeguard.demo.project.tasks"
MEMORY_APP = "tests.harness.memory_app"


@dataclass
class Validated:
    """One ``lifeguard validate --json`` run: exit status, parsed output, stderr."""

    code: int
    result: dict[str, Any]
    stderr: str

    def criterion(self, name: str) -> dict[str, Any]:
        found = [c for c in self.result["criteria"] if c["name"] == name]
        assert found, f"no criterion {name}: {self.result.get('criteria')}"
        return found[0]

    def statuses(self) -> dict[str, str]:
        return {c["name"]: c["status"] for c in self.result["criteria"]}


def validate(worker: CeleryWorker, app: str, task: str, *args: str, **kw: Any) -> Validated:
    """``lifeguard validate -A app --task task --json ...`` with the worker's environment
    (the app reads its broker and database from it), sampled every 0.25 s."""
    command = ["validate", "-A", app, "--task", task, "--json", "--interval", "0.25"]
    command += ["--settle", "1", *args]
    completed = lifeguard(*command, env=worker.env, timeout=kw.get("timeout", 180))
    try:
        result = json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
        ) from None
    return Validated(completed.returncode, result, completed.stderr)


def memory_worker(redis_url: str, queue: str, options: str = "{}", **kw: Any) -> CeleryWorker:
    """A (not started) worker of the memory sandbox app (no database)."""
    return CeleryWorker(
        MEMORY_APP,
        queue=queue,
        concurrency=kw.pop("concurrency", 2),
        env={
            "LIFEGUARD_SANDBOX_BROKER_URL": f"{redis_url}/14",
            "LIFEGUARD_SANDBOX_QUEUE": queue,
            "LIFEGUARD_SANDBOX_MODE": kw.pop("mode", "lifeguard"),
            "LIFEGUARD_SANDBOX_OPTIONS": options,
        },
        **kw,
    )


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_run(html: Path, workdir: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a local file, offline-minded: no network services, no sync."""
    browser = chromium()
    assert browser is not None
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={workdir / 'chromium-profile'}",
            *mode,
            html.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def data_block(dom: str) -> dict[str, Any]:
    """The records JSON the page embeds, as the browser parsed the page."""
    start_tag = f'<script type="application/json" id="{DATA_ELEMENT_ID}">'
    start = dom.index(start_tag) + len(start_tag)
    parsed: dict[str, Any] = json.loads(dom[start : dom.index("</script>", start)])
    return parsed


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
