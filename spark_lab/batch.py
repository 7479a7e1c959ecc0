"""Batch jobs on Dask: summarize / embed / generate / imagine over many inputs, one machine or many.

    from spark_lab.batch import local_cluster, run_batch, read_results
    with local_cluster(workers=2) as client:                  # or Client("tcp://host:8786")
        report = run_batch("summarize", "docs/", "summaries.jsonl", client=client, max_words=80)
    rows = read_results("summaries.jsonl")                    # one row per input: id, ok, output, ...

This module knows tasks, not models: each worker calls the same public functions a notebook
calls (`spark_lab.summarize.summarize`, `SentenceEncoder.encode`, `LLM.generate/chat`,
`TextToImagePipeline`). What it adds is the distribution around them:

inputs      a folder (one item per .txt/.md/.html/.pdf file, id = path inside the folder), a
            list (of str, dicts or paths), a JSONL file ({"id": ..., "text"|"prompt": ...} per
            line) or a Parquet file (columns id?, text|prompt). Files are read on the client,
            so the workers need no shared file system.
workers     by default an embedded LocalCluster sized to the machine: worker *processes*, one
            task at a time each, every process pinned to cores // workers compute threads
            (SPARK_LAB_THREADS, OMP_*, NUMBA_NUM_THREADS), so workers x threads <= cores. With
            `scheduler="tcp://host:8786"` (or DASK_SCHEDULER_ADDRESS) the same job runs on an
            existing cluster (`dask scheduler` + `dask worker`, dask-ssh, Kubernetes, HPC).
models      load once per worker process and stay loaded (`_MODELS`, keyed by kind, name and
            device); `run_batch` loads them on every worker before the clock starts.
results     appended to a JSONL journal as they complete, one line per input (id, ok, output,
            error, seconds, worker, ...), flushed and fsynced line by line. A rerun skips the
            ids already there (resume). The journal is the only record, so there is nothing to
            get out of step: a crash mid-line leaves a line that does not parse, which reading
            ignores (and the item is recomputed); should an id ever be written twice, reading
            keeps one row (an ok row over an error row, else the last). At the end of a run the
            journal is rewritten without such leftovers (to a temporary file, then renamed).
            `--out x.parquet` journals to `x.parquet.jsonl` and writes the Parquet file from it
            at the end, the same way.
faults      a worker that dies mid-task: Dask reruns its tasks on the others (the nanny restarts
            it); a task that kills `distributed.scheduler.allowed-failures` + 1 workers, an
            unreadable/empty/too-long input or an exception inside the task becomes an error
            row for that item, and the run goes on.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

TASKS = ("summarize", "embed", "generate", "imagine")
DOC_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".xhtml", ".pdf")  # a folder's items
MAX_INPUT_WORDS = 200_000   # longer inputs get an error row instead of tying a worker up for hours
THREAD_VARS = ("SPARK_LAB_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS")


# ---------------------------------------------------------------------------- inputs

@dataclass
class Item:
    id: str                       # unique within a run; the resume key
    text: str | None = None       # the text or prompt (None: read `path` when submitting)
    path: str | None = None       # a document to read with the summarize readers


def _item_from_dict(d: dict, n: int, where: str) -> Item:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object with 'text' or 'prompt', got {type(d).__name__}")
    text = d.get("text", d.get("prompt"))
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: 'text'/'prompt' must be a string, got {type(text).__name__}")
    return Item(str(d.get("id", n)), text if text is not None else "")


def load_inputs(source, pattern: str = "**/*") -> list[Item]:
    """A folder, a list, a .jsonl or a .parquet file -> items with unique ids (see the module doc)."""
    if isinstance(source, (list, tuple)):
        items = []
        for n, x in enumerate(source):
            if isinstance(x, Path):
                items.append(Item(x.name, path=str(x)))
            elif isinstance(x, str):
                items.append(Item(str(n), x))
            else:
                items.append(_item_from_dict(x, n, f"input {n}"))
    else:
        p = Path(source)
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {p}")
        if p.is_dir():
            files = sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in DOC_SUFFIXES)
            if not files:
                raise ValueError(f"{p} has no documents ({', '.join(DOC_SUFFIXES)})")
            items = [Item(f.relative_to(p).as_posix(), path=str(f)) for f in files]
        elif p.suffix.lower() == ".jsonl":
            items = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n + 1} is not JSON ({e.msg})") from None
                items.append(_item_from_dict(d, n, f"{p}:{n + 1}"))
        elif p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq
            t = pq.read_table(p)
            col = "text" if "text" in t.column_names else "prompt" if "prompt" in t.column_names else None
            if col is None:
                raise ValueError(f"{p} has no 'text' or 'prompt' column (columns: {', '.join(t.column_names)})")
            texts = t.column(col).to_pylist()
            ids = t.column("id").to_pylist() if "id" in t.column_names else range(len(texts))
            items = [Item(str(i), x if x is not None else "") for i, x in zip(ids, texts)]
        else:
            items = [Item(p.name, path=str(p))]   # one document
    seen = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"duplicate id {it.id!r} in the input; ids must be unique to resume a run")
        seen.add(it.id)
    return items


def _read(item: Item, max_input_words: int) -> str:
    """The item's text, read on the client; raises ValueError/OSError with one line for bad inputs."""
    if item.path is not None:
        from .summarize import read_document
        try:
            text = read_document(item.path)
        except ValueError:
            if item.path.lower().endswith(".pdf"):   # taken as soon as the readers learn PDF
                raise ValueError("PDF is not supported by spark_lab.summarize's readers yet; "
                                 "convert it to text first (e.g. pdftotext)") from None
            raise
    else:
        text = item.text or ""
    if not text.strip():
        raise ValueError("input is empty")
    words = len(text.split())
    if words > max_input_words:
        raise ValueError(f"input is too long: {words} words (limit {max_input_words})")
    return text


# ---------------------------------------------------------------------------- on the worker

_MODELS: dict[tuple, object] = {}   # (kind, name, device) -> loaded model, one per worker process
_LOAD = threading.Lock()
_PINNED = threading.local()


def _pin_threads() -> None:
    """SPARK_LAB_THREADS for this task thread (numba's thread count is per thread)."""
    if not getattr(_PINNED, "done", False):
        from .device import set_threads
        set_threads()
        _PINNED.done = True


def _model(kind: str, name: str):
    from .device import get_device
    key = (kind, name, get_device().kind)
    with _LOAD:
        if key not in _MODELS:
            if kind == "embedding":
                from .text.bert import SentenceEncoder
                _MODELS[key] = SentenceEncoder.load(name)
            elif kind == "llm":
                from .llm import LLM
                _MODELS[key] = LLM.load(name)
            else:
                from .diffusion.pipeline import TextToImagePipeline
                _MODELS[key] = TextToImagePipeline.from_pretrained(name)
        return _MODELS[key]


def _models_for(task: str, params: dict) -> list[tuple[str, str]]:
    """(kind, name) of the models a task needs, loaded once per worker."""
    encoder = ("embedding", params.get("encoder") or "all-minilm-l6-v2")
    llm = ("llm", params.get("model") or "smollm2-135m-instruct")
    if task == "summarize":
        method = params.get("method", "extractive")
        return {"extractive": [encoder], "abstractive": [llm], "hybrid": [encoder, llm]}[method]
    if task == "embed":
        return [("embedding", params.get("model") or "all-minilm-l6-v2")]
    if task == "generate":
        return [llm]
    return [("diffusion", params.get("model") or "spark-emoji")]


def load_models(task: str, params: dict) -> float:
    """Load the task's models into this worker's cache; returns the seconds it took."""
    t0 = time.perf_counter()
    _pin_threads()
    for kind, name in _models_for(task, params):
        _model(kind, name)
    return time.perf_counter() - t0


def _summarize(text: str, p: dict) -> tuple:
    from .summarize import summarize
    method = p.get("method", "extractive")
    enc = _model("embedding", p.get("encoder") or "all-minilm-l6-v2") if method != "abstractive" else None
    llm = _model("llm", p.get("model") or "smollm2-135m-instruct") if method != "extractive" else None
    s = summarize(text, method=method, max_words=p.get("max_words", 150), llm=llm, encoder=enc,
                  max_new_tokens=p.get("max_new_tokens"), progress=False)
    return s.text, {"words_in": s.words_in, "words_out": s.words_out}


def _embed(text: str, p: dict) -> tuple:
    enc = _model("embedding", p.get("model") or "all-minilm-l6-v2")
    e = enc.encode([text])[0]                                   # [dim] float32, unit length
    return [float(x) for x in e], {"dim": int(e.shape[0])}


def _generate(text: str, p: dict) -> tuple:
    llm = _model("llm", p.get("model") or "smollm2-135m-instruct")
    gen = dict(max_new_tokens=p.get("max_new_tokens", 128), temperature=p.get("temperature", 0.0),
               seed=p.get("seed", 0))
    g = llm.generate(text, **gen) if p.get("raw") else llm.chat([{"role": "user", "content": text}], **gen)
    return g.text, {"tokens": len(g.token_ids), "prompt_tokens": len(g.prompt_token_ids),
                    "finish_reason": g.finish_reason, "tokens_per_second": g.tokens_per_second}


def _imagine(text: str, p: dict) -> tuple:
    import io
    pipe = _model("diffusion", p.get("model") or "spark-emoji")
    img = pipe(text, num_inference_steps=p.get("steps", 25), guidance_scale=p.get("guidance"),
               seed=p.get("seed", 0), progress=False)[0]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return None, {"png": buf.getvalue(), "size": list(img.size)}   # the client writes the file


RUNNERS = {"summarize": _summarize, "embed": _embed, "generate": _generate, "imagine": _imagine}


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def run_item(task: str, item_id: str, text: str, params: dict) -> dict:
    """One input -> one result row. Runs on a worker; an exception becomes an error row."""
    started = time.time()
    t0 = time.perf_counter()
    row = {"id": item_id, "task": task, "ok": True, "output": None, "error": None}
    try:
        _pin_threads()
        out, extra = RUNNERS[task](text, params)
        row["output"] = out
        row.update(extra)
    except Exception as e:
        row.update(ok=False, error=_one_line(e))
    row["seconds"] = time.perf_counter() - t0
    row["started"] = started
    try:
        from distributed import get_worker
        row["worker"] = get_worker().address
    except (ImportError, ValueError):
        row["worker"] = None
    row["host"], row["pid"] = socket.gethostname(), os.getpid()
    return row


# ---------------------------------------------------------------------------- results

def _better(new: dict, old: dict | None) -> bool:
    """Which of two rows for one id to keep: an ok row beats an error row, else the later one."""
    return old is None or bool(new.get("ok")) or not old.get("ok")


class ResultLog:
    """The append-only JSONL journal of a run (see the module doc)."""

    def __init__(self, out):
        self.out = Path(out)
        self.parquet = self.out.suffix.lower() == ".parquet"
        self.journal = self.out.with_name(self.out.name + ".jsonl") if self.parquet else self.out
        self._fh = None

    def _lines(self):
        if not self.journal.exists():
            return
        with open(self.journal, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return                       # a line cut short by a crash
                try:
                    row = json.loads(line)
                except ValueError:
                    continue                     # a partial line that another one was appended to
                if isinstance(row, dict) and "id" in row:
                    yield row

    def rows(self) -> list[dict]:
        """One row per id (first-seen order)."""
        best: dict[str, dict] = {}
        for row in self._lines():
            if _better(row, best.get(row["id"])):
                best[row["id"]] = row
        if not best and self.parquet and self.out.exists():
            import pyarrow.parquet as pq
            best = {r["id"]: r for r in pq.read_table(self.out).to_pylist()}
        return list(best.values())

    def done_ids(self, include_errors: bool = True) -> set:
        return {r["id"] for r in self.rows() if include_errors or r.get("ok")}

    def reset(self) -> None:
        for p in (self.journal, self.out):
            if p.exists():
                p.unlink()

    def append(self, row: dict) -> None:
        if self._fh is None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.journal, "ab")
            if self._fh.tell() > 0:              # end a line a crash cut short, so ours parses
                with open(self.journal, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._fh.write(b"\n")
        self._fh.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> list[dict]:
        """Rewrite the journal without duplicates or cut lines; write the Parquet file if asked."""
        self.close()
        rows = self.rows()
        n_lines = sum(1 for _ in open(self.journal, "rb")) if self.journal.exists() else 0
        if self.journal.exists() and n_lines != len(rows):
            _atomic_write(self.journal, b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n"
                                                 for r in rows))
        if self.parquet and rows:
            import io
            import pyarrow as pa
            import pyarrow.parquet as pq
            buf = io.BytesIO()
            keys = list(dict.fromkeys(k for r in rows for k in r))   # error rows lack the task's extras
            pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), buf)
            _atomic_write(self.out, buf.getvalue())
        return rows


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_results(out) -> list[dict]:
    """The rows of a run's output (.jsonl or .parquet), one per input."""
    p = Path(out)
    if p.suffix.lower() == ".parquet" and p.exists():
        import pyarrow.parquet as pq
        return pq.read_table(p).to_pylist()
    return ResultLog(out).rows()


# ---------------------------------------------------------------------------- the cluster

def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cluster_size(workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(worker processes, compute threads per worker) with workers x threads <= cores."""
    cores = machine_cores()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if workers is None:
        workers = max(1, cores // (threads or 1))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


def local_cluster(workers: int | None = None, threads: int | None = None, dashboard: bool = True):
    """An embedded LocalCluster sized to the machine -> a Client (closing it closes the cluster).

    Each worker is a process running one task at a time with `threads` compute threads."""
    import logging
    import dask
    from distributed import Client, LocalCluster
    workers, threads = cluster_size(workers, threads)
    env = {k: str(threads) for k in THREAD_VARS}
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
        address = ":0" if dashboard else None
    except ImportError:
        address = None
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_, and glibc then stops adapting its mmap
    # threshold: every large NumPy temporary becomes a fresh mmap + page faults (MiniLM's
    # matmuls ran ~1.5x slower in a worker than in a plain process). The models here keep
    # their memory, so the workers get glibc's default.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, env=env,
                               dashboard_address=address, silence_logs=logging.ERROR)
    client = Client(cluster)
    client._spark_lab_owns_cluster = cluster
    return client


def connect(scheduler: str | None = None, workers: int | None = None, threads: int | None = None):
    """A Client: to `scheduler` (or $DASK_SCHEDULER_ADDRESS) when given, else a new local cluster."""
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if address:
        from distributed import Client
        try:
            return Client(address)   # waits distributed.comm.timeouts.connect (30 s by default)
        except OSError as e:
            raise ValueError(f"cannot reach the Dask scheduler at {address}: {_one_line(e)}") from None
    return local_cluster(workers, threads)


def close(client) -> None:
    cluster = getattr(client, "_spark_lab_owns_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def dashboard_link(client) -> str | None:
    """The Dask dashboard's URL, or None when bokeh is not installed (then no dashboard runs)."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return None
    return client.dashboard_link


# ---------------------------------------------------------------------------- a run

@dataclass
class BatchReport:
    out: str                 # the results file
    task: str
    total: int               # inputs
    computed: int            # rows written by this run
    skipped: int             # already done (resume)
    errors: int              # error rows written by this run
    seconds: float           # wall time of the items (after the models were loaded)
    load_seconds: float      # loading the models on every worker
    workers: int
    dashboard: str | None = None
    per_worker: dict = field(default_factory=dict)   # worker address -> rows it computed

    @property
    def items_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["items_per_second"] = self.items_per_second
        return d


def _check_params(task: str, params: dict) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    for k in ("max_words", "max_new_tokens", "steps"):
        if params.get(k) is not None and int(params[k]) <= 0:
            raise ValueError(f"{k} must be positive, got {params[k]}")
    if task == "summarize":
        from .summarize import METHODS
        if params.get("method", "extractive") not in METHODS:
            raise ValueError(f"method {params['method']!r} is not one of {', '.join(METHODS)}")


def run_batch(task: str, inputs, out, *, client=None, scheduler: str | None = None,
              workers: int | None = None, threads: int | None = None, resume: bool = True,
              retry_errors: bool = False, progress="tqdm", on_row=None, window: int | None = 1024,
              max_input_words: int = MAX_INPUT_WORDS, images: str | None = None,
              pattern: str = "**/*", **params) -> BatchReport:
    """Map `task` over `inputs` on a Dask cluster, writing one row per input to `out` as each completes.

    client       a distributed.Client; else `scheduler`/DASK_SCHEDULER_ADDRESS, else a LocalCluster
                 of `workers` processes x `threads` threads (closed again at the end)
    resume       skip ids already in `out` (error rows too, unless `retry_errors`); False starts over
    progress     "tqdm" (a bar), "dask" (Dask's progress widget/bar over the submitted tasks) or None
    on_row       called with each row as it is written (tests, live displays)
    window       tasks in flight at once (None: all); inputs are read as they are submitted, so a
                 corpus never sits in memory whole; Dask's widget follows the first window
    pattern      which files of a folder input (a glob; the suffix must still be a document's)
    images       folder for `imagine`'s PNGs (default: OUT's name + "_images" beside it)
    params       the task's options: method, max_words, model, encoder, max_new_tokens,
                 temperature, seed, raw, steps, guidance
    """
    _check_params(task, params)
    items = load_inputs(inputs, pattern)
    log = ResultLog(out)
    if not resume:
        log.reset()
    done = log.done_ids(include_errors=not retry_errors) if resume else set()
    todo = [it for it in items if it.id not in done]
    img_dir = Path(images) if images else Path(out).with_name(Path(out).stem + "_images")

    report = BatchReport(str(out), task, len(items), 0, len(items) - len(todo), 0, 0.0, 0.0, 0)
    if not todo and client is None:
        log.finish()
        return report                                   # all done already: no cluster needed
    own = client is None
    if own:
        client = connect(scheduler, workers, threads)
    report.workers = len(client.scheduler_info()["workers"])
    report.dashboard = dashboard_link(client)
    pending: dict = {}
    bar = None
    try:
        if todo:
            t0 = time.perf_counter()
            # every worker loads the models before the clock starts (as tasks, in the worker's
            # task thread: a long load inside client.run would block its heartbeats)
            # (loose placement: a worker that dies meanwhile must not leave its load waiting forever)
            loads = [client.submit(load_models, task, params, workers=[w], allow_other_workers=True,
                                   pure=False, key=f"load-{task}-{uuid.uuid4().hex[:8]}")
                     for w in client.scheduler_info()["workers"]]
            client.gather(loads)
            report.load_seconds = time.perf_counter() - t0
        from distributed import as_completed
        token = uuid.uuid4().hex[:8]
        queue = iter(todo)
        counter = iter(range(len(todo)))
        t0 = time.perf_counter()

        def write(row):
            if row.get("png") is not None:
                img_dir.mkdir(parents=True, exist_ok=True)
                name = "".join(c if c.isalnum() or c in "-_." else "_" for c in row["id"]) + ".png"
                _atomic_write(img_dir / name, row.pop("png"))
                row["output"] = str(img_dir / name)
            row.pop("png", None)
            row.setdefault("finished", time.time())
            log.append(row)
            report.computed += 1
            report.errors += not row["ok"]
            if row.get("worker"):
                report.per_worker[row["worker"]] = report.per_worker.get(row["worker"], 0) + 1
            if bar is not None:
                bar.update(1)
            if on_row is not None:
                on_row(row)

        def submit_next():
            for it in queue:
                try:
                    text = _read(it, max_input_words)
                except (OSError, ValueError, UnicodeError) as e:
                    write({"id": it.id, "task": task, "ok": False, "output": None, "error": _one_line(e),
                           "seconds": 0.0, "started": time.time(), "worker": None})
                    continue
                f = client.submit(run_item, task, it.id, text, params, key=f"{task}-{token}-{next(counter)}",
                                  pure=False, retries=0)
                pending[f.key] = (f, it.id)
                return f
            return None

        if progress == "dask":
            from distributed.utils import is_kernel
            progress = "dask" if is_kernel() else "tqdm"   # in a terminal Dask's bar would block
        if progress == "tqdm":
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc=f"batch {task}", unit="item")
        first = [f for f in (submit_next() for _ in range(window or len(todo))) if f is not None]
        if progress == "dask" and first:
            from distributed import progress as dask_progress
            from IPython.display import display
            display(dask_progress(first, multi=False, notebook=True))   # a widget, updated by the client
        ac = as_completed(first)
        for f in ac:
            _, item_id = pending.pop(f.key)
            try:
                row = f.result()
            except Exception as e:   # KilledWorker (the item killed several workers), lost data, ...
                row = {"id": item_id, "task": task, "ok": False, "output": None, "error": _one_line(e),
                       "seconds": 0.0, "started": None, "worker": None}
            write(row)
            nxt = submit_next() if window else None
            if nxt is not None:
                ac.add(nxt)
        report.seconds = time.perf_counter() - t0
    finally:
        for f, _ in pending.values():
            f.cancel()
        if bar is not None:
            bar.close()
        log.finish()
        if own:
            close(client)
    return report


def warm_sequential(task: str, items, **params) -> list[dict]:
    """The same task in this process, one item after another (the reference a distributed run
    must match): rows with id, ok, output, error."""
    load_models(task, params)
    rows = []
    for it in load_inputs(items):
        try:
            text = _read(it, MAX_INPUT_WORDS)
        except (OSError, ValueError, UnicodeError) as e:
            rows.append({"id": it.id, "ok": False, "output": None, "error": _one_line(e)})
            continue
        r = run_item(task, it.id, text, params)
        rows.append({k: r[k] for k in ("id", "ok", "output", "error")})
    return rows


def scaling(task: str, inputs, workers=(1, 2), threads: int = 1, folder=None, **params) -> list[dict]:
    """Throughput of the same job on LocalClusters of `workers` processes x `threads` threads.

    Models are loaded before the clock starts; each run writes a fresh file in `folder` (a
    temporary one by default). -> [{"workers", "items", "seconds", "items_per_second",
    "speedup", "same_outputs"}], speedup against the first entry, same_outputs: every output
    equals the first run's."""
    import tempfile
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            out = Path(folder or tmp) / f"{task}-{n}-workers.jsonl"
            client = local_cluster(workers=n, threads=threads, dashboard=False)
            try:
                rep = run_batch(task, inputs, out, client=client, resume=False, progress=None, **params)
            finally:
                close(client)
            outputs = {r["id"]: r["output"] for r in read_results(out)}
            first = first or (rep, outputs)
            rows.append({"workers": n, "items": rep.computed, "seconds": rep.seconds,
                         "items_per_second": rep.items_per_second,
                         "speedup": rep.items_per_second / first[0].items_per_second,
                         "same_outputs": outputs == first[1]})
    return rows


# ---------------------------------------------------------------------------- CLI

def cmd_batch(args) -> int:
    """`spark-lab batch summarize|embed|generate|imagine INPUT --out OUT [--workers N] [--scheduler ADDR]`"""
    import sys
    params = {k: getattr(args, k) for k in ("model", "method", "max_words", "max_new_tokens",
                                            "temperature", "seed", "steps", "guidance")
              if getattr(args, k, None) is not None}
    if getattr(args, "raw", False):
        params["raw"] = True
    rep = run_batch(args.task, args.input, args.out, scheduler=args.scheduler, workers=args.workers,
                    threads=args.threads, resume=args.resume, retry_errors=args.retry_errors,
                    progress="tqdm" if sys.stderr.isatty() or args.progress else None, **params)
    if args.json:
        print(json.dumps(rep.to_dict()))
    else:
        print(f"{rep.task}: {rep.computed} computed ({rep.errors} errors), {rep.skipped} already done, "
              f"{rep.items_per_second:.2f} items/s on {rep.workers} worker{'s' if rep.workers != 1 else ''}"
              f" -> {rep.out}")
    if rep.errors:
        print(f"spark-lab batch: {rep.errors} input{'s' if rep.errors != 1 else ''} failed; "
              f"their rows in {rep.out} say why", file=sys.stderr)
    return 0
