"""Repacked weights kept on disk: a later process maps them instead of repacking.

The kernels read weights in their own row-interleaved layout (repack.py), a copy as large as the
model (4.9 GB for Llama-3-8B Q4_K_M) made the first time each layer runs. Writing that copy into
fresh anonymous memory is what a cold process's first token waits on: on a VM whose host backs
guest memory lazily, each fresh GB costs 2-5 s on first touch, while pages of a file already in
the page cache cost nothing. So for a big GGUF (MIN_FILE_BYTES) each weight's repacked arrays
are written straight into a cache file under ~/.cache/spark_lab/repacked/ (a shared file mapping:
no second copy in memory), and the next process maps that file copy-on-write instead of
repacking. The GGUF's own pages are then never read for those weights.

    entry = CacheEntry.of([qt, ...], G)   # None: off, a small file, or not a file mapping
    hit = entry.load()                    # (kind, arrays) or None
    arrays = entry.alloc(specs)           # [(shape, dtype)] -> arrays in a new cache file
    entry.commit(kind)                    # the entry exists from here on

An entry is keyed by the GGUF's real path, size and modification time, each tensor's offset in
the file, its type and shape, the group size and LAYOUT (bumped when repack.py's layout changes).
Its .json sidecar is renamed into place last, after the arrays: a half-written entry (a killed
process) is never read. SPARK_LAB_REPACK_CACHE=0 turns the cache off; =1 uses it for any file
size (tests); unset: files of MIN_FILE_BYTES or more. Without room on disk (what the entry needs
plus MIN_FREE_BYTES) the arrays go to memory as before. The first entry a process looks up
sweeps the folder once: entries whose GGUF is gone or changed since or whose LAYOUT is not this
one, and temporary files of processes that no longer run, are deleted (`prune`);
`rm -rf ~/.cache/spark_lab/repacked` is safe. The first lookup for a GGUF also starts `read_ahead`:
a thread asking the kernel to read that GGUF's entries into the page cache, oldest first (the
order a forward pass uses them), so a cold process's first prompt does not fault them in a few
pages at a time (gpt-oss-20b, page cache dropped: first token 22.5-25.3 s -> 18.0-18.5 s).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np

LAYOUT = 5                     # repack.py's array layouts; a change makes every old entry a miss
MIN_FILE_BYTES = 1 << 30       # GGUFs this big or bigger keep their repacked copy on disk
MIN_FREE_BYTES = 2 << 30       # leave this much disk free
ALIGN = 4096                   # each array starts on a page
_PRUNED = False                # prune() ran in this process
_READ_AHEAD: dict = {}         # GGUF path -> the thread reading its entries ahead (read_ahead)


def _mode() -> str | None:
    v = os.environ.get("SPARK_LAB_REPACK_CACHE", "").strip().lower()
    return {"0": "off", "off": "off", "false": "off", "1": "on", "on": "on", "true": "on"}.get(v)


def cache_root() -> Path:
    from ...models import cache_dir
    return cache_dir() / "repacked"


def file_offset(data) -> tuple[str, int] | None:
    """(file name, byte offset in it) of a C-contiguous view of a read-only np.memmap, else None."""
    obj = data
    while obj is not None and not isinstance(obj, np.memmap):
        obj = getattr(obj, "base", None)
    if obj is None or obj.mode != "r" or not getattr(obj, "filename", None) or not data.flags.c_contiguous:
        return None
    mm = obj._mmap
    base = np.frombuffer(mm, np.uint8).ctypes.data                  # where the mapping starts
    start = obj.offset - obj.offset % mmap.ALLOCATIONGRANULARITY     # its offset in the file (np.memmap's rule)
    return str(obj.filename), data.ctypes.data - base + start


class CacheEntry:
    """The cached repack of one weight, or of a stack of weights repacked as one (prepare_stack)."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self._tmp = self._specs = None        # the file being written and its layout (alloc -> commit)

    @classmethod
    def of(cls, qts, G: int) -> "CacheEntry | None":
        mode = _mode()
        if mode == "off":
            return None
        parts, gguf = [], None
        for q in qts:
            where = file_offset(q.data)
            if where is None or (gguf is not None and where[0] != gguf):
                return None
            gguf = where[0]
            parts.append([where[1], int(q.qtype), list(q.shape)])
        st = os.stat(gguf)
        if mode != "on" and st.st_size < MIN_FILE_BYTES:
            return None
        key = dict(layout=LAYOUT, file=os.path.realpath(gguf), size=st.st_size, mtime_ns=st.st_mtime_ns,
                   G=int(G), tensors=parts)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        if not _PRUNED:
            prune()
        if key["file"] not in _READ_AHEAD:
            read_ahead(key)
        return cls(cache_root() / digest, key)

    # ------------------------------------------------------------------ read

    def load(self):
        """(kind, arrays) from a complete entry whose key matches, else None."""
        meta_path, bin_path = self.path.with_suffix(".json"), self.path.with_suffix(".bin")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != self.key:
                return None
            with open(bin_path, "rb") as f:
                if os.fstat(f.fileno()).st_size != meta["bytes"]:
                    return None
                mm = mmap.mmap(f.fileno(), meta["bytes"], access=mmap.ACCESS_COPY)   # writable views, file pages
        except (OSError, ValueError, KeyError, TypeError):
            return None
        arrays = tuple(np.frombuffer(mm, np.dtype(dt), int(np.prod(shape)), off).reshape(shape)
                       for off, shape, dt in meta["arrays"])
        return meta["kind"], arrays

    # ------------------------------------------------------------------ write

    def alloc(self, specs):
        """[(shape, dtype)] -> zero-filled arrays backed by a new cache file (memory arrays
        instead when the disk lacks room or the file cannot be made)."""
        layout, off = [], 0
        for shape, dt in specs:
            n = int(np.prod(shape)) * np.dtype(dt).itemsize
            layout.append((off, [int(s) for s in shape], np.dtype(dt).str))
            off += -(-n // ALIGN) * ALIGN
        total = max(off, ALIGN)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.path.parent).free < total + MIN_FREE_BYTES:
                return None
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w+b") as f:
                f.truncate(total)
                mm = mmap.mmap(f.fileno(), total, access=mmap.ACCESS_WRITE)       # shared: writes reach the file
        except OSError:
            return None
        self._tmp, self._specs = tmp, dict(bytes=total, arrays=layout)
        return [np.frombuffer(mm, np.dtype(dt), int(np.prod(shape)), o).reshape(shape) for o, shape, dt in layout]

    def commit(self, kind: str) -> None:
        """The arrays are complete: move the file into place, then its sidecar (the entry exists)."""
        if self._tmp is None:
            return
        bin_path, meta_path = self.path.with_suffix(".bin"), self.path.with_suffix(".json")
        meta_tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
        try:
            os.replace(self._tmp, bin_path)
            meta_tmp.write_text(json.dumps(dict(key=self.key, kind=kind, **self._specs)))
            os.replace(meta_tmp, meta_path)
        except OSError:
            for p in (self._tmp, meta_tmp):
                try:
                    p.unlink()
                except OSError:
                    pass
        self._tmp = None


def _stale(key: dict) -> bool:
    if key.get("layout") != LAYOUT:                            # made by another version of the kernels
        return True
    try:
        st = os.stat(key["file"])
    except OSError:
        return True
    return st.st_size != key.get("size") or st.st_mtime_ns != key.get("mtime_ns")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def prune(root: Path | None = None) -> int:
    """Delete entries whose GGUF is gone or changed or whose layout is another version's, temporary
    files of dead processes and files orphaned an hour ago or more -> how many files were deleted."""
    global _PRUNED
    _PRUNED = True
    root = cache_root() if root is None else root
    gone = 0
    try:
        names = list(root.iterdir())
    except OSError:
        return 0
    for p in names:
        try:
            if p.suffix == ".tmp":                             # <digest>.<suffix>.<pid>.tmp
                pid = p.name.rsplit(".", 2)[-2]
                if pid.isdigit() and not _alive(int(pid)):
                    p.unlink()
                    gone += 1
            elif p.suffix == ".bin" and not p.with_suffix(".json").exists() and time.time() - p.stat().st_mtime > 3600:
                p.unlink()                                     # a process died between the two renames
                gone += 1
            elif p.suffix == ".json" and _stale(json.loads(p.read_text()).get("key", {})):
                p.unlink()                                     # the sidecar first: the entry stops existing
                p.with_suffix(".bin").unlink(missing_ok=True)
                gone += 2
        except (OSError, ValueError, AttributeError):
            continue
    return gone


# ---------------------------------------------------------------------------- read-ahead

def entries_in_use_order(key: dict, root: Path | None = None) -> list[tuple[Path, int]]:
    """(.bin path, bytes) of the complete entries of key's GGUF (same path, size, mtime, LAYOUT),
    oldest first: the process that wrote them repacked each weight as a layer first ran, so file
    age is the order a forward pass reads them."""
    root = cache_root() if root is None else root
    found = []
    try:
        names = list(root.glob("*.json"))
    except OSError:
        return []
    for meta in names:
        try:
            k = json.loads(meta.read_text()).get("key", {})
            if (k.get("file"), k.get("size"), k.get("mtime_ns"), k.get("layout")) != \
                    (key["file"], key["size"], key["mtime_ns"], LAYOUT):
                continue
            b = meta.with_suffix(".bin")
            st = b.stat()
            found.append((st.st_mtime_ns, str(b), st.st_size))
        except (OSError, ValueError, AttributeError):
            continue
    return [(Path(b), n) for _, b, n in sorted(found)]


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _advise(entries, budget: int) -> int:
    """Ask the kernel to read each file into the page cache (POSIX_FADV_WILLNEED), in order, until
    `budget` bytes -> bytes asked for."""
    asked = 0
    for path, n in entries:
        if asked + n > budget:
            break
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            continue
        asked += n
    return asked


def read_ahead(key: dict):
    """Start reading the GGUF's cached entries from disk in the background, in the order a forward
    pass uses them (first use of the cache for that GGUF in this process).

    Why. A cold process whose entries are not in the page cache (evicted by another big process)
    faults the repacked weights in as the first prompt's layers touch them: a few page-sized reads
    at a time, ~0.5 GB/s here, while the disk streams 1 GB/s. Asked for in order ahead of use, the
    pages are there when the layers run. Only as much as fits in the memory available now (less 1
    GiB): reading past it would evict the pages the first layers need. Returns the thread."""
    import threading
    if not hasattr(os, "posix_fadvise"):
        return None

    def run():
        entries = entries_in_use_order(key)
        _advise(entries, _available_bytes() - (1 << 30))

    t = threading.Thread(target=run, name="spark-lab-read-ahead", daemon=True)
    _READ_AHEAD[key["file"]] = t
    t.start()
    return t
