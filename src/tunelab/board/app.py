"""The board's HTTP API (FastAPI) and its page (static files, no build step). docs/board.md.

Safety (docs/board.md, tests/board/test_api.py):
  * every path a request names resolves inside the runs directory (`runs.inside`); launched runs write there only
    (the board sets `output_dir`; the recipe itself refuses a `name` that is not one plain path component);
  * a recipe is validated (`tunelab.validate.load_validated_recipe`) before any process starts;
  * with a token (required to bind anywhere but loopback), every request carries it: `Authorization: Bearer`, or
    the cookie set by opening `/?token=...` once;
  * on loopback without a token, the Host header must be a loopback name (a page elsewhere that rebinds its DNS
    name to 127.0.0.1 is refused), and requests that change anything must carry `X-Tunelab-Board: 1`, which a
    cross-site form cannot send.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from tunelab.board import forms
from tunelab.board.events import EventFeed
from tunelab.board.jobs import JobQueue
from tunelab.board.runs import (
    READABLE,
    Forbidden,
    RunCache,
    disk_status,
    find_dirs,
    inside,
    lock_holder,
    run_detail,
    sweep_row,
)

STATIC = Path(__file__).with_name("static")
COOKIE = "tunelab_board"
CSRF_HEADER = "x-tunelab-board"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Board:
    """State shared by the routes: the root, the queue, the row cache."""

    def __init__(self, root: Path, *, max_parallel: int = 1, command: list[str] | None = None):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.queue = JobQueue(self.root, max_parallel=max_parallel, command=command)
        self.cache = RunCache()

    def status(self, run_dir: Path) -> str:
        job = self.queue.latest_for(run_dir)
        if job is not None and (job.status in ("queued", "running", "stopping") or not run_dir.is_dir()):
            return job.status
        disk = disk_status(run_dir)
        if job is not None and disk != "running" and job.status in ("failed", "stopped"):
            return job.status  # the board saw it end: say how
        return disk

    def run_dir(self, rid: str) -> Path:
        try:
            path = inside(self.root, rid)
        except Forbidden as e:
            raise HTTPException(403, str(e)) from None
        if not (path / "recipe.yaml").is_file() and self.queue.latest_for(path) is None:
            raise HTTPException(404, f"no run {rid!r}")
        return path

    def snapshot(self) -> dict[str, Any]:
        runs, sweeps = find_dirs(self.root)
        rows = []
        for p in runs:
            row = self.cache.row(self.root, p)
            row["status"] = self.status(p)
            rows.append(row)
        known = {r["id"] for r in rows}
        for job in self.queue.snapshot():  # queued runs have no directory yet
            if job["run"] not in known and job["status"] in ("queued", "running", "stopping", "failed", "cancelled"):
                known.add(job["run"])
                rows.append({"id": job["run"], "name": Path(job["run"]).name, "status": job["status"],
                             "updated": job["created"]})
        rows.sort(key=lambda r: r.get("updated") or 0, reverse=True)
        return {"runs": rows, "sweeps": [sweep_row(self.root, s) for s in sweeps], "jobs": self.queue.snapshot()}

    def unique_name(self, name: str) -> str:
        taken = self.queue.pending_names()
        candidate, i = name, 2
        while (self.root / candidate).exists() or candidate in taken:
            candidate, i = f"{name}-{i}", i + 1
        return candidate


def create_app(root: str | Path, *, token: str | None = None, max_parallel: int = 1,
               command: list[str] | None = None, poll_s: float = 1.0) -> FastAPI:
    board = Board(Path(root), max_parallel=max_parallel, command=command)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        board.queue.shutdown()  # stop dispatching; the runs themselves go on

    app = FastAPI(title="tunelab board", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.board = board

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or \
                request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given, token):
                return JSONResponse({"detail": "a token is required (open the URL the board printed)"}, 401)
            if request.query_params.get("token") and request.method == "GET" and request.url.path == "/":
                resp = RedirectResponse("/", 303)  # the token moves to a cookie, out of the address bar
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return resp
        else:
            hostport = request.headers.get("host", "")
            host = hostport[1:].split("]")[0] if hostport.startswith("[") else hostport.split(":")[0]
            if host not in LOOPBACK:
                return JSONResponse({"detail": f"host {host!r} refused: the board answers on loopback only"}, 403)
        if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
            return JSONResponse({"detail": f"requests that change something carry {CSRF_HEADER}: 1"}, 403)
        return await call_next(request)

    # -- the page -----------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index() -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    # -- reading ------------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return board.snapshot()

    @app.get("/api/run/{rid:path}")
    def run(rid: str) -> dict[str, Any]:
        path = board.run_dir(rid)
        if not (path / "recipe.yaml").is_file():  # queued: nothing on disk yet
            return {"id": rid, "name": path.name, "status": board.status(path), "metrics": [], "evals": {},
                    "recipe_yaml": "", "summary": {}}
        detail = run_detail(board.root, path)
        detail["status"] = board.status(path)
        job = board.queue.latest_for(path)
        detail["job"] = job.public(board.root) if job else None
        detail["holder"] = lock_holder(path)
        return detail

    @app.get("/api/log/{rid:path}")
    def run_log(rid: str) -> Response:
        job = board.queue.latest_for(board.run_dir(rid))
        if job is None or not job.log_path.is_file():
            raise HTTPException(404, "the board did not start this run: no log")
        return Response(job.log_path.read_bytes()[-200_000:], media_type="text/plain; charset=utf-8")

    @app.get("/api/files/{rel:path}")
    def files(rel: str) -> Response:
        try:
            path = inside(board.root, rel)
        except Forbidden as e:
            raise HTTPException(403, str(e)) from None
        if not path.is_file() or path.suffix not in READABLE:
            raise HTTPException(404, f"no readable file {rel!r}")
        return FileResponse(path)

    @app.get("/api/compare", response_class=HTMLResponse)
    def compare(run: Annotated[list[str] | None, Query()] = None) -> Response:
        from tunelab.track.report import render_report

        if not run:
            raise HTTPException(400, "choose runs to compare: /api/compare?run=A&run=B")
        paths = [board.run_dir(r) for r in run]
        return HTMLResponse(render_report(paths, f"tunelab board: {len(paths)} runs compared"))

    @app.get("/api/catalogue")
    def catalogue() -> dict[str, Any]:
        return forms.catalogue()

    @app.get("/api/schema")
    def schema() -> dict[str, Any]:
        return {"fields": forms.recipe_fields(), **forms.catalogue(), "recipes": forms.shipped_recipes(),
                "runs_dir": str(board.root)}

    # -- launching ----------------------------------------------------------------------------------------------
    @app.post("/api/validate")
    async def validate(request: Request) -> dict[str, Any]:
        recipe, errors = await _recipe_from(request)
        return {"ok": recipe is not None, "errors": errors, "yaml": forms.resolved_yaml(recipe) if recipe else None,
                "values": recipe.model_dump(mode="json") if recipe else None}

    @app.post("/api/launch")
    async def launch(request: Request) -> JSONResponse:
        recipe, errors = await _recipe_from(request)
        if recipe is None:
            return JSONResponse({"ok": False, "errors": errors}, 422)
        name = board.unique_name(recipe.name)
        recipe.name, recipe.output_dir = name, str(board.root)  # launched runs write under the root, nowhere else
        path = board.root / ".board" / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(forms.resolved_yaml(recipe))
        job = board.queue.submit(board.root / name, ["run", str(path)])
        return JSONResponse({"ok": True, "run": name, "job": job.public(board.root)})

    async def _recipe_from(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "send JSON: {\"yaml\": TEXT} or {\"overrides\": [\"a.b=value\", ...]}") from None
        if isinstance(body, dict) and isinstance(body.get("overrides"), list):
            return forms.validate_overrides([str(o) for o in body["overrides"]])
        if not isinstance(body, dict) or not isinstance(body.get("yaml"), str):
            raise HTTPException(400, "send JSON: {\"yaml\": TEXT} or {\"overrides\": [...]}")
        scratch = board.root / ".board" / "recipes" / f".check-{time.monotonic_ns()}.yaml"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text(body["yaml"])
        try:
            return forms.validate_yaml_file(scratch)
        finally:
            scratch.unlink(missing_ok=True)

    @app.post("/api/stop/{rid:path}")
    def stop(rid: str) -> dict[str, Any]:
        path = board.run_dir(rid)
        job = board.queue.stop(path)
        if job is not None:
            return {"ok": True, "status": job.status}
        holder = lock_holder(path)  # a run started elsewhere on this machine: signal its process
        if holder is None:
            raise HTTPException(409, f"{rid} is not running")
        import os
        import signal

        os.kill(int(holder["pid"]), signal.SIGTERM)
        return {"ok": True, "status": "stopping"}

    @app.post("/api/resume/{rid:path}")
    def resume(rid: str) -> dict[str, Any]:
        path = board.run_dir(rid)
        if board.status(path) in ("queued", "running", "stopping"):
            raise HTTPException(409, f"{rid} is already {board.status(path)}")
        if not (path / "recipe.yaml").is_file():
            raise HTTPException(409, f"{rid} has no recipe.yaml to resume")
        job = board.queue.submit(path, ["run", str(path), "--resume"], kind="resume")
        return {"ok": True, "job": job.public(board.root)}

    # -- live updates -------------------------------------------------------------------------------------------
    @app.get("/api/events")
    async def events(request: Request, run: str | None = None, after: int = 0) -> StreamingResponse:
        path = board.run_dir(run) if run else None
        feed = EventFeed(board.snapshot, path, (lambda: board.status(path)) if path else None, after=after)

        async def stream():
            last = time.monotonic()
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                chunks = await asyncio.to_thread(feed.poll)
                for c in chunks:
                    yield c
                if chunks:
                    last = time.monotonic()
                elif time.monotonic() - last > 15:
                    yield ": keep-alive\n\n"
                    last = time.monotonic()
                await asyncio.sleep(poll_s)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.exception_handler(json.JSONDecodeError)
    async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse({"detail": f"malformed JSON: {exc}"}, 400)

    return app
