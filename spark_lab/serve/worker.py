"""Each model's worker thread, the jobs that run there one at a time, and the registry that loads models."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..models import CATALOGUE, DEFAULT_EMBEDDER, DEFAULT_IMAGE_MODEL, ModelNotFound, is_present
from .config import KINDS, POLL_S, ServerConfig
from .schemas import APIError

class Worker:
    """One model and the one thread its jobs run on, one at a time, in the order they came."""

    def __init__(self, model_id: str, kind: str, max_waiting: int, parallel: int = 1, timeout: float | None = None):
        from ..device import set_threads
        self.id, self.kind, self.max_waiting = model_id, kind, max_waiting
        self.parallel = int(parallel) if kind == "llm" else 1   # chat requests decode together (engine.py)
        self.timeout = timeout                # seconds a request may take (None: no limit)
        self.model = None                    # an LLM, SentenceEncoder or TextToImagePipeline once loaded
        self.engine = None                   # a chat model's BatchEngine / SerialEngine
        self.is_loading = False
        self.jobs = 0                        # submitted and not yet finished (running + waiting)
        self.active: set = set()             # Jobs not yet finished, so shutdown can stop them
        self.served = self.cancelled = 0     # answers delivered; requests whose client left before the end
        self.timed_out = 0
        self.loading = asyncio.Lock()
        # SPARK_LAB_THREADS is pinned in the worker thread too: numba's thread count is per thread
        self.executor = ThreadPoolExecutor(self.parallel, thread_name_prefix=f"spark-serve-{model_id}", initializer=set_threads)

    def submit(self, fn, *args):
        if self.jobs >= self.parallel + self.max_waiting:
            e = APIError(429, f"model {self.id!r} has {self.jobs} requests in flight ({self.parallel} decoding, "
                              f"at most {self.max_waiting} waiting); try again later", code="rate_limit_exceeded",
                         type="rate_limit_error")
            e.headers = {"Retry-After": "1"}
            raise e
        loop = asyncio.get_running_loop()
        self.jobs += 1
        cf = self.executor.submit(fn, *args)
        cf.add_done_callback(lambda _: self._finished(loop))
        return cf

    def _finished(self, loop):                    # on the worker thread, or the loop's when cancelled
        def one_less():
            self.jobs -= 1
        with contextlib.suppress(RuntimeError):   # the loop has closed
            loop.call_soon_threadsafe(one_less)


@dataclass
class End:
    result: object = None
    error: BaseException | None = None


class Job:
    """fn(*args, emit=..., cancelled=...) on a model's worker thread; what it emits comes back to the
    event loop piece by piece, then its result (or its exception)."""

    def __init__(self, worker: Worker, fn, *args):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.worker = worker
        self.future = worker.submit(self._run, fn, args)
        worker.active.add(self)
        self.future.add_done_callback(lambda _: worker.active.discard(self))

    def _run(self, fn, args):                       # on the worker thread
        if self.cancel.is_set():
            return
        try:
            self._emit(End(fn(*args, emit=self._emit, cancelled=self.cancel.is_set)))
        except BaseException as e:                  # noqa: BLE001 -- handed to the event loop
            self._emit(End(error=e))

    def _emit(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:                        # the event loop is gone: nobody is listening
            self.cancel.set()

    def stop(self):
        self.cancel.set()
        self.future.cancel()                        # a job still waiting in line never starts

    async def items(self, request=None):
        """Yield emitted pieces, then the End; stop (and free the slot) if the client goes away or the
        request outlives the worker's timeout (APIError 504)."""
        getter, next_check, finished = None, self.loop.time() + POLL_S, False
        deadline = None if not self.worker.timeout else self.loop.time() + self.worker.timeout
        try:
            while True:
                getter = getter or asyncio.ensure_future(self.queue.get())
                wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - self.loop.time()))
                done, _ = await asyncio.wait({getter}, timeout=wait)
                if not done and deadline is not None and self.loop.time() >= deadline:
                    self.worker.timed_out += 1
                    raise APIError(504, f"the request took longer than the server's limit of {self.worker.timeout:g} s "
                                        "(spark-lab serve --timeout)", code="timeout", type="server_error")
                if request is not None and self.loop.time() >= next_check:   # tokens may flow faster than this
                    next_check = self.loop.time() + POLL_S
                    if await request.is_disconnected():
                        return
                if not done:
                    continue
                item, getter = getter.result(), None
                if isinstance(item, End) and item.error is not None:
                    raise as_api_error(item.error)
                if isinstance(item, End):
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if finished:
                self.worker.served += 1
            else:
                self.worker.cancelled += 1
            self.stop()
            if getter is not None:
                getter.cancel()

    async def result(self, request=None):
        """Wait for the end; -> (pieces, result)."""
        pieces = []
        async for item in self.items(request):
            if isinstance(item, End):
                return pieces, item.result
            pieces.append(item)
        raise APIError(499, "the client closed the connection", code="client_closed_request")


def as_api_error(e: BaseException) -> BaseException:
    """A worker's exception -> what the client should see (APIErrors and cancellations pass through)."""
    if isinstance(e, APIError) or not isinstance(e, Exception):
        return e
    if isinstance(e, MemoryError):
        return APIError(400, f"not enough memory for this request: {e}", code="insufficient_memory")
    if isinstance(e, ValueError):                   # the engine's one-line errors about a request
        return APIError(400, str(e), code="invalid_value")
    return APIError(500, f"{type(e).__name__}: {e}")


class Registry:
    """Served model ids -> workers; models load on first use and stay loaded."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.served = config.served()
        self.workers: dict[str, Worker] = {}
        self.created = int(time.time())

    def listing(self) -> list[dict]:
        rows = []
        for mid, (kind, source) in self.served.items():
            present = is_present(source) if source in CATALOGUE else Path(source).exists()
            if present:
                rows.append({"id": mid, "object": "model", "created": self.created, "owned_by": "spark_lab",
                             "kind": kind, "loaded": mid in self.workers and self.workers[mid].model is not None})
        return rows

    async def get(self, model_id: str | None, kind: str) -> Worker:
        """-> the model's worker, loading the model on first use (on its own thread)."""
        if model_id is None:
            model_id = {"llm": self.config.default_model_id, "embedding": DEFAULT_EMBEDDER,
                        "diffusion": DEFAULT_IMAGE_MODEL}[kind]
        if model_id not in self.served:
            raise APIError(404, f"The model {model_id!r} does not exist (GET /v1/models lists the served ones)",
                           param="model", code="model_not_found")
        have, source = self.served[model_id]
        if have != kind:
            raise APIError(400, f"model {model_id!r} is {KINDS[have]}; this endpoint needs {KINDS[kind]}",
                           param="model", code="model_not_supported")
        w = self.workers.get(model_id)
        if w is None:
            w = self.workers[model_id] = Worker(model_id, kind, self.config.max_waiting, self.config.parallel,
                                                self.config.timeout)
        async with w.loading:
            if w.model is None:
                loop = asyncio.get_running_loop()
                w.is_loading = True
                try:
                    model = await loop.run_in_executor(w.executor, load_model, kind, source, self.config.n_ctx)
                    if kind == "llm":
                        from .engine import make_engine
                        w.engine = make_engine(model, w.parallel)
                    w.model = model
                except (ModelNotFound, FileNotFoundError) as e:
                    raise APIError(404, str(e), param="model",
                                   code="model_not_found") from None
                except MemoryError as e:
                    raise APIError(503, f"model {model_id!r} does not fit in memory: {e}", code="out_of_memory")
                except Exception as e:
                    raise APIError(500, f"model {model_id!r} failed to load: {type(e).__name__}: {e}") from None
                finally:
                    w.is_loading = False
        return w

    def close(self):
        """Stop every job (a running generation ends within a token) and let the threads go."""
        for w in self.workers.values():
            for job in list(w.active):
                job.stop()
            w.executor.shutdown(wait=False, cancel_futures=True)
            if w.engine is not None:
                w.engine.close()


def load_model(kind: str, source: str, n_ctx: int | None):
    if kind == "llm":
        from ..llm import LLM
        return LLM.load(source, n_ctx=n_ctx)
    if kind == "embedding":
        from ..text.bert import SentenceEncoder
        return SentenceEncoder.load(source)
    from ..diffusion import TextToImagePipeline
    return TextToImagePipeline.from_pretrained(source)
