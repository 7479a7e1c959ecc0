"""spark_lab.batch: jobs mapped over a Dask cluster give the sequential run's outputs, each input
exactly once, across a killed worker, an interrupted run and bad inputs; the CLI end to end, on a
LocalCluster and on a scheduler + workers started as separate processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from spark_lab import batch as B  # noqa: E402
from spark_lab.models import ModelNotFound, resolve  # noqa: E402

DATA = Path(__file__).parent / "data" / "summaries"
SPARK_LAB = str(Path(sys.executable).parent / "spark-lab")
DASK = str(Path(sys.executable).parent / "dask")
N = 10   # paragraphs summarized per run


def _minilm():
    try:
        resolve("all-minilm-l6-v2", kind="embedding")
    except ModelNotFound:
        pytest.skip("all-MiniLM-L6-v2 is not installed (make setup)")


def paragraphs(n):
    """n real paragraphs (60-140 words) of the summary test documents: short, distinct inputs."""
    ps = [p for f in sorted(DATA.glob("0*.txt")) if ".ref" not in f.name
          for p in f.read_text(encoding="utf-8").split("\n\n") if len(p.split()) >= 60]
    assert len(ps) >= n
    return ps[:n]


@pytest.fixture(scope="module")
def client():
    _minilm()
    c = B.local_cluster(workers=2, threads=1, dashboard=False)
    yield c
    B.close(c)


@pytest.fixture(scope="module")
def reference():
    """The sequential, in-process extractive summaries of N paragraphs, by id."""
    _minilm()
    rows = B.warm_sequential("summarize", paragraphs(N), max_words=30)
    assert all(r["ok"] for r in rows)
    return {r["id"]: r["output"] for r in rows}


def _ids(path):
    """Ids of every parseable line of a journal (duplicates kept, to count them)."""
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- no cluster

def test_inputs_folder_list_jsonl_parquet(tmp_path):
    items = B.load_inputs(DATA)
    assert [it.id for it in items][:3] == ["01_urban_beekeeping.ref.txt", "01_urban_beekeeping.txt", "02_lighthouses.md"]
    assert "README.md" in [it.id for it in items] and all(it.path for it in items)
    assert [(it.id, it.text) for it in B.load_inputs(["a b", "c"])] == [("0", "a b"), ("1", "c")]
    j = tmp_path / "in.jsonl"
    j.write_text('{"id": "x", "text": "one"}\n\n{"prompt": "two"}\n')
    assert [(it.id, it.text) for it in B.load_inputs(j)] == [("x", "one"), ("2", "two")]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": [7, 8], "prompt": ["p", None]}), tmp_path / "in.parquet")
    assert [(it.id, it.text) for it in B.load_inputs(tmp_path / "in.parquet")] == [("7", "p"), ("8", "")]
    j.write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(ValueError, match="duplicate id '1'"):
        B.load_inputs(j)
    j.write_text('{"id": 1, "text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2 is not JSON"):
        B.load_inputs(j)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        B.load_inputs(tmp_path / "missing")


def test_journal_dedupes_and_survives_a_cut_line(tmp_path):
    out = tmp_path / "r.jsonl"
    log = B.ResultLog(out)
    log.append({"id": "a", "ok": False, "error": "boom"})
    log.append({"id": "b", "ok": True, "output": "B"})
    log.close()
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "ok": true, "out')          # a crash in the middle of a line
    assert [r["id"] for r in B.read_results(out)] == ["a", "b"]
    log = B.ResultLog(out)
    log.append({"id": "a", "ok": True, "output": "A"})    # the retry of a failed item
    log.append({"id": "b", "ok": False, "error": "late"})  # an error never replaces a result
    rows = log.finish()
    assert [(r["id"], r["ok"], r.get("output")) for r in rows] == [("a", True, "A"), ("b", True, "B")]
    assert _ids(out) == ["a", "b"]                        # compacted: one line per id, cut line gone


def test_cluster_size_never_oversubscribes():
    cores = B.machine_cores()
    for w in range(1, cores + 1):
        n, t = B.cluster_size(workers=w)
        assert n == w and t == max(1, cores // w) and (n * t <= cores)
    assert B.cluster_size() == (cores, 1)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        B.cluster_size(workers=0)


# ---------------------------------------------------------------------------- on a LocalCluster

def test_summaries_match_the_sequential_run_exactly_once(client, reference, tmp_path):
    out = tmp_path / "s.jsonl"
    rep = B.run_batch("summarize", paragraphs(N), out, client=client, max_words=30, progress=None)
    assert (rep.computed, rep.skipped, rep.errors, rep.workers) == (N, 0, 0, 2)
    assert sorted(_ids(out), key=int) == [str(i) for i in range(N)]
    rows = B.read_results(out)
    assert {r["id"]: r["output"] for r in rows} == reference
    assert len({r["pid"] for r in rows}) == 2 and os.getpid() not in {r["pid"] for r in rows}
    assert all(r["seconds"] > 0 and r["worker"].startswith("tcp://") for r in rows)


def test_interrupted_run_resumes_with_only_the_missing_items(client, reference, tmp_path):
    out = tmp_path / "s.jsonl"
    seen = []

    def stop_after_5(row):
        seen.append(row["id"])
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        B.run_batch("summarize", paragraphs(N), out, client=client, max_words=30, progress=None,
                    on_row=stop_after_5)
    assert sorted(_ids(out)) == sorted(seen)
    again = []
    rep = B.run_batch("summarize", paragraphs(N), out, client=client, max_words=30, progress=None,
                      on_row=lambda r: again.append(r["id"]))
    assert (rep.skipped, rep.computed) == (5, N - 5)
    assert not set(again) & set(seen)
    assert sorted(_ids(out), key=int) == [str(i) for i in range(N)]
    assert {r["id"]: r["output"] for r in B.read_results(out)} == reference
    rep = B.run_batch("summarize", paragraphs(N), out, client=client, max_words=30, progress=None)
    assert (rep.skipped, rep.computed) == (N, 0)


def test_bad_inputs_get_error_rows_and_the_rest_goes_on(client, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, p in enumerate(paragraphs(3)):
        (folder / f"doc{i}.txt").write_text(p)
    (folder / "empty.md").write_text("   \n")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (folder / "long.txt").write_text("word " * 500)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n<< /Length 3 >>\nstream\n\x00\x01\x02\nendstream")
    out = tmp_path / "s.jsonl"
    rep = B.run_batch("summarize", folder, out, client=client, max_words=30, progress=None,
                      max_input_words=400)
    rows = {r["id"]: r for r in B.read_results(out)}
    assert sorted(rows) == sorted(["doc0.txt", "doc1.txt", "doc2.txt", "empty.md", "binary.txt", "long.txt", "latin1.txt", "scan.pdf"])
    assert all(rows[f"doc{i}.txt"]["ok"] and rows[f"doc{i}.txt"]["output"] for i in range(3))
    assert "empty" in rows["empty.md"]["error"]
    assert "binary" in rows["binary.txt"]["error"]
    assert rows["long.txt"]["error"] == "ValueError: input is too long: 500 words (limit 400)"
    assert "not UTF-8" in rows["latin1.txt"]["error"]
    assert rows["scan.pdf"]["error"].startswith("ValueError: PDF is not supported")
    assert (rep.computed, rep.errors) == (8, 5)
    # a model that cannot load stops the run up front, with one line, before any item
    with pytest.raises(ModelNotFound, match="no model 'no-such-encoder'"):
        B.run_batch("summarize", ["One sentence here."], tmp_path / "e.jsonl", client=client,
                    encoder="no-such-encoder", progress=None)


def test_embed_matches_the_encoder_and_writes_parquet(client, tmp_path):
    from spark_lab.text.bert import SentenceEncoder
    texts = paragraphs(4)
    out = tmp_path / "e.parquet"
    rep = B.run_batch("embed", texts, out, client=client, progress=None)
    assert rep.computed == 4 and out.exists()
    import pyarrow.parquet as pq
    assert pq.read_table(out).num_rows == 4
    rows = sorted(B.read_results(out), key=lambda r: int(r["id"]))
    enc = SentenceEncoder.load("all-minilm-l6-v2")
    ref = np.stack([enc.encode([t])[0] for t in texts])   # one text per call, as each task does
    got = np.array([r["output"] for r in rows], dtype=np.float32)
    assert got.shape == (4, 384) and rows[0]["dim"] == 384
    np.testing.assert_array_equal(got, ref)        # the same code on the same inputs: bit for bit


def test_generate_with_a_tiny_gguf_gives_the_engines_tokens(client, tmp_path):
    from spark_lab.llm import LLM
    from tests.llm.tiny import write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    prompts = ["hello", "abc", "xy xy"]
    too_long = "z" * 300                            # one word, but more bytes than the 256-token context
    rep = B.run_batch("generate", prompts + [too_long], tmp_path / "g.jsonl", client=client,
                      model=str(path), raw=True, max_new_tokens=6, progress=None)
    assert (rep.computed, rep.errors) == (4, 1)
    rows = sorted(B.read_results(tmp_path / "g.jsonl"), key=lambda r: int(r["id"]))
    assert not rows[3]["ok"] and rows[3]["error"].startswith("ContextOverflow") and rows[3]["worker"]
    llm = LLM.load(str(path))
    for p, r in zip(prompts, rows[:3]):
        g = llm.generate(p, max_new_tokens=6, temperature=0.0)
        assert r["output"] == g.text and r["tokens"] == len(g.token_ids) == 6


def test_imagine_writes_the_pipelines_images(client, tmp_path):
    from PIL import Image
    from spark_lab.diffusion.pipeline import TextToImagePipeline
    prompts = [{"id": "apple/1", "prompt": "a red apple"}, {"id": "cat", "prompt": "a cat face"}]
    rep = B.run_batch("imagine", prompts, tmp_path / "i.parquet", client=client, steps=2, progress=None)
    assert (rep.computed, rep.errors) == (2, 0)
    rows = {r["id"]: r for r in B.read_results(tmp_path / "i.parquet")}
    assert rows["apple/1"]["output"] == str(tmp_path / "i_images" / "apple_1.png")
    pipe = TextToImagePipeline.from_pretrained("spark-emoji")
    for d in prompts:
        ref = np.asarray(pipe(d["prompt"], num_inference_steps=2, seed=0, progress=False)[0])
        np.testing.assert_array_equal(np.asarray(Image.open(rows[d["id"]]["output"])), ref)


def test_a_killed_worker_s_tasks_finish_elsewhere(client, reference, tmp_path):
    out = tmp_path / "s.jsonl"
    pids = client.run(os.getpid)                   # worker address -> pid
    killed = {}

    def kill_a_busy_worker(row):
        if killed:
            return
        busy = [w for w, keys in client.processing().items() if keys]
        victim = busy[0]
        os.kill(pids[victim], signal.SIGKILL)
        killed["pid"], killed["keys"], killed["at"] = pids[victim], busy and client.processing()[victim], time.time()

    rep = B.run_batch("summarize", paragraphs(N), out, client=client, max_words=30, progress=None,
                      on_row=kill_a_busy_worker, window=4)   # 4 in flight: later inputs go to the survivors
    assert killed["keys"], "the killed worker was running something"
    assert (rep.computed, rep.errors) == (N, 0)
    assert sorted(_ids(out), key=int) == [str(i) for i in range(N)]
    rows = B.read_results(out)
    assert {r["id"]: r["output"] for r in rows} == reference
    assert all(r["ok"] for r in rows) and killed["pid"] not in {r["pid"] for r in rows if r["finished"] > killed["at"]}
    client.wait_for_workers(2, timeout=60)         # the nanny restarts it for the next tests


# ---------------------------------------------------------------------------- the command line

def _run(*args, env=None, timeout=180):
    e = dict(os.environ, SPARK_LAB_THREADS="1", **(env or {}))
    e.pop("DASK_SCHEDULER_ADDRESS", None)
    return subprocess.run([SPARK_LAB, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env=e)


def _jsonl(tmp_path, n):
    j = tmp_path / "in.jsonl"
    j.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(paragraphs(n))))
    return j


def test_cli_batch_summarize_on_a_local_cluster(reference, tmp_path):
    _minilm()
    j = _jsonl(tmp_path, 6)
    out = tmp_path / "o.jsonl"
    r = _run("batch", "summarize", str(j), "--out", str(out), "--workers", "1", "--max-words", "30", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["computed"], rep["skipped"], rep["workers"]) == (6, 0, 1)
    rows = {x["id"]: x["output"] for x in B.read_results(out)}
    assert rows == {f"p{i}": reference[str(i)] for i in range(6)}
    r = _run("batch", "summarize", str(j), "--out", str(out), "--workers", "1", "--max-words", "30")
    assert r.returncode == 0 and "0 computed" in r.stdout and "6 already done" in r.stdout


def test_cli_errors_are_one_line(tmp_path):
    r = _run("batch", "summarize", str(tmp_path / "missing"), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"spark-lab batch: error: no such file or folder: {tmp_path / 'missing'}"]
    j = _jsonl(tmp_path, 1)
    r = _run("batch", "embed", str(j), "--out", str(tmp_path / "o.jsonl"), "--scheduler", "tcp://127.0.0.1:9",
             env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_batch_on_a_scheduler_and_two_workers_started_apart(reference, tmp_path):
    """The non-embedded way: `dask scheduler` and two `dask worker` processes, reached by address."""
    _minilm()
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, SPARK_LAB_THREADS="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([DASK, "worker", addr, "--nworkers", "1", "--nthreads", "1",
                                           "--no-dashboard", "--host", "127.0.0.1"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env=env))
        from distributed import Client
        deadline = time.time() + 60
        while True:
            try:
                with Client(addr, timeout="2s") as c:
                    c.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        j = _jsonl(tmp_path, 6)
        out = tmp_path / "o.jsonl"
        r = _run("batch", "summarize", str(j), "--out", str(out), "--scheduler", addr, "--max-words", "30", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert (rep["computed"], rep["workers"]) == (6, 2)
        rows = B.read_results(out)
        assert {x["id"]: x["output"] for x in rows} == {f"p{i}": reference[str(i)] for i in range(6)}
        assert {x["worker"] for x in rows} <= set(rep["per_worker"]) and len(rep["per_worker"]) >= 1
        # the same address through the environment, and the cluster outlives the run
        one = tmp_path / "one.jsonl"
        one.write_text(j.read_text().splitlines()[0] + "\n")
        r = subprocess.run([SPARK_LAB, "batch", "summarize", str(one), "--out", str(tmp_path / "o2.jsonl"),
                            "--max-words", "30", "--json"], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=120, env=dict(env, DASK_SCHEDULER_ADDRESS=addr))
        assert r.returncode == 0, r.stderr
        assert (json.loads(r.stdout)["workers"], json.loads(r.stdout)["computed"]) == (2, 1)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_bench_batch_quick_matches_the_sequential_run():
    """`spark-lab bench batch`'s measurement at a small size: both cluster sizes give the
    sequential run's summaries for every document (the 200-document run is `make bench`)."""
    _minilm()
    from spark_lab.benchmarks import batch as bench
    res = bench.measure(8, repeats=1)
    assert res["same_as_sequential"]
    assert [r["workers"] for r in res["runs"]] == [1, 2]
    assert len(set(bench.documents(200))) == 200
