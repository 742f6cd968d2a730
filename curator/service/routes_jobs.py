"""Job routes: submit (write scope), list, look at, follow (Server-Sent Events), read the log, cancel."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from curator.service.deps import read_scope, service_of, write_scope
from curator.service.models import FINAL_STATES, MAX_PAGE, JobRecord, JobRequest, Page, device_of
from curator.service.paths import confine, looks_like_path

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(min_length=1, max_length=100)]
KEEPALIVE_S = 15.0


def _confined(request: Request, job) -> dict:
    """The job's parameters with every server-side path resolved inside the roots."""
    svc = service_of(request)
    params = job.model_dump(mode="json", exclude={"kind", "after"})
    if job.kind == "ingest":
        params["paths"] = [str(confine(p, svc.roots, f"body.paths.{i}")) for i, p in enumerate(job.paths)]
    for key in ("model",):
        value = params.get("config", {}).get(key)
        if value and (looks_like_path(value) or any((root / value).exists() for root in svc.roots)):
            params["config"][key] = str(confine(value, svc.roots, f"body.config.{key}"))
    if job.kind == "export":
        params["out"] = (str(confine(job.out, svc.roots, "body.out")) if job.out
                         else str(svc.ws.root / "exports" / job.mixture.replace("/", "_")))
        if job.tokenizer and looks_like_path(job.tokenizer):
            params["tokenizer"] = str(confine(job.tokenizer, svc.roots, "body.tokenizer"))
    return params


@router.post("/jobs", status_code=202, dependencies=[Depends(write_scope)])
def submit(request: Request, job: Annotated[JobRequest, Body()]) -> JobRecord:
    """Queue a job. It runs in a worker process once the jobs it follows have ended (`after`; by default every
    job submitted before it) and its lane is free: one job at a time per device for fit, score, sketch and
    index, one at a time for the catalog jobs. Server-side paths must lie inside the server's --root folders."""
    return service_of(request).jobs.submit(job.kind, _confined(request, job), device_of(job), job.after)


@router.get("/jobs", dependencies=[Depends(read_scope)])
def jobs(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
         offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> Page[JobRecord]:
    everything = sorted(service_of(request).jobs.jobs.values(), key=lambda j: j.submitted_at, reverse=True)
    return {"items": everything[offset:offset + limit], "total": len(everything), "limit": limit,
            "offset": offset}


@router.get("/jobs/{job_id}", dependencies=[Depends(read_scope)])
def job(request: Request, job_id: JobId) -> JobRecord:
    return service_of(request).jobs.get(job_id)


@router.get("/jobs/{job_id}/log", response_class=PlainTextResponse, dependencies=[Depends(read_scope)])
def job_log(request: Request, job_id: JobId) -> str:
    """The end of the job's log (its worker's output)."""
    return service_of(request).jobs.log_tail(job_id)


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(write_scope)])
def cancel(request: Request, job_id: JobId) -> JobRecord:
    return service_of(request).jobs.cancel(job_id)


@router.get("/jobs/{job_id}/events", dependencies=[Depends(read_scope)],
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def events(request: Request, job_id: JobId):
    """Server-Sent Events: `job` with the whole record whenever it changes (state or progress), then `end`."""
    manager = service_of(request).jobs
    manager.get(job_id)         # a 404 before the stream starts

    async def stream():
        seen, quiet = -1, 0.0
        while True:
            record, version = manager.snapshot(job_id)
            if version != seen:
                seen, quiet = version, 0.0
                yield f"event: job\ndata: {record.model_dump_json()}\n\n"
            if record.state in FINAL_STATES:
                yield f"event: end\ndata: {json.dumps({'state': record.state})}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.2)
            quiet += 0.2
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
