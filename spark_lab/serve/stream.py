"""One generation answered as JSON or as server-sent events, and the usage/timings blocks."""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse, StreamingResponse

from .jobs import decode_job
from .schemas import APIError
from .worker import End, Job

def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_of(g) -> dict:
    p, c = len(g.prompt_token_ids), len(g.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def timings_of(g) -> dict:
    return {"prompt_n": len(g.prompt_token_ids), "prompt_per_second": round(g.prompt_tokens_per_second, 2),
            "predicted_n": len(g.token_ids), "predicted_per_second": round(g.tokens_per_second, 2)}


async def generation_response(request, worker, prompt_ids, sampling, stream, include_usage, make_chunk, make_body):
    """Run one generation; answer JSON (make_body(gen)) or SSE (make_chunk(piece|None, gen|None))."""
    job = Job(worker, decode_job, worker.engine, prompt_ids, sampling, request.app.state.metrics)
    if not stream:
        _, gen = await job.result(request)
        return JSONResponse(make_body(gen))

    async def events():
        try:
            first = make_chunk(None, None)                   # the role announcement, before any token
            if first is not None:
                yield sse(first)
            async for item in job.items(request):
                if isinstance(item, End):
                    gen = item.result
                    yield sse(make_chunk(None, gen))
                    if include_usage:
                        u = make_chunk(None, gen)
                        u.update(choices=[], usage=usage_of(gen))
                        yield sse(u)
                    yield "data: [DONE]\n\n"
                else:
                    c = make_chunk(item, None)                 # None: held back (a tool call forming)
                    if c is not None:
                        yield sse(c)
        except Exception as e:                                # headers are gone: report in-band
            err = e if isinstance(e, APIError) else APIError(500, f"{type(e).__name__}: {e}")
            yield sse(err.body())

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
