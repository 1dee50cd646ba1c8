"""Write-behind: written chunk files reach the disk and leave the page cache; data unchanged."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
from pathlib import Path

import numpy as np
import pytest

from jacrun import writeback
from jacrun.config import config_from_dict
from jacrun.prepare import prepare
from jacrun.runner import open_output
from jacrun.store import WriteBehindStore, write_block
from tests.helpers import job_config

pytestmark = pytest.mark.skipif(not writeback.SUPPORTED, reason="needs Linux sync_file_range")

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore on a read-only mapping; touches nothing)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            assert _LIBC.mincore(address, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec)
        finally:
            _LIBC.munmap(address, size)
    finally:
        os.close(fd)


@pytest.fixture
def droppable(tmp_path: Path) -> Path:
    """``tmp_path``, if write-behind can drop its written pages there (tmpfs keeps them, and
    overlayfs ignores the wait: skip)."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    assert writeback._drop(probe) is None
    if resident_pages(probe):
        pytest.skip("this filesystem keeps written pages in memory (tmpfs, overlayfs?)")
    probe.unlink()
    return tmp_path


@pytest.fixture
def small_lag(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 4 MiB lag and an empty pending list, so a few small files exercise the whole cycle."""
    monkeypatch.setattr(writeback, "LAG_BYTES", 4 << 20)
    monkeypatch.setattr(writeback, "_pending", type(writeback._pending)())
    monkeypatch.setattr(writeback, "_pending_bytes", [0])
    monkeypatch.setattr(writeback, "_checking", [])
    monkeypatch.setattr(writeback, "_errors", type(writeback._errors)(maxlen=writeback.MAX_ERRORS))
    return writeback.LAG_BYTES


def write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    writeback.written(path, size)
    return data


def linear_job(folder: Path, samples: int = 2048, n_out: int = 4, save_outputs: bool = False):
    """(config, plan) of a linear job in blocks of 512 samples, each writing one 4 MiB chunk
    of VJPs (float64, 512 x 1024), and its y when ``save_outputs``; the store is created."""
    store = folder / "out.zarr"
    config = config_from_dict(
        job_config(
            str(store),
            function={"kind": "linear", "n_in": 1024, "n_out": n_out, "seed": 0},
            inputs={"kind": "random", "samples": samples, "seed": 1},
            vectors={"kind": "random", "count": 1, "seed": 2},
            output={"store": str(store), "compression": "none", "save_outputs": save_outputs},
            chunks={"samples": 512},
        )
    )
    return config, open_output(prepare(config, calibrate=False)).plan


def test_files_leave_the_page_cache_once_later_writes_pass_the_lag(droppable: Path, small_lag: int) -> None:
    size = 2 << 20
    files = [droppable / f"chunk{i}" for i in range(5)]
    contents = [write(path, size) for path in files]
    # 10 MiB written with a 4 MiB lag: the first three files were dropped, the last two not yet
    assert [resident_pages(path) for path in files[:3]] == [0, 0, 0]
    assert resident_pages(files[-1]) > 0  # not yet dropped (only memory pressure could evict it)
    assert writeback.pending_bytes() == 2 * size
    assert [path.read_bytes() for path in files] == contents  # from disk, unchanged


def test_small_files_are_left_to_the_kernel(droppable: Path, small_lag: int) -> None:
    small = droppable / "zarr.json"
    write(small, 1000)
    for i in range(4):
        write(droppable / f"chunk{i}", 2 << 20)
    assert resident_pages(small) == 1 and writeback.pending_bytes() == 2 * (2 << 20)


def test_a_file_deleted_before_its_turn_is_skipped(droppable: Path, small_lag: int) -> None:
    first = droppable / "gone"
    write(first, 2 << 20)
    first.unlink()  # a rerun with --overwrite removed the store meanwhile
    for i in range(3):
        write(droppable / f"chunk{i}", 2 << 20)
    # "gone" left the list without error, and so did chunk0, on time
    assert writeback.pending_bytes() == 2 * (2 << 20)
    assert resident_pages(droppable / "chunk0") == 0


def test_writeback_starts_at_once_and_the_drop_waits_for_the_disk(
    tmp_path: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of the system calls per file: advice at write time (starts the writeback),
    then, one lag later, the wait and only after it the drop."""
    calls: list[tuple[str, str]] = []
    names: dict[int, str] = {}
    real_open = os.open

    def opened(path, flags, *args):  # noqa: ANN001, ANN202
        fd = real_open(path, flags, *args)
        names[fd] = Path(path).name
        return fd

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        calls.append(("advise", names[fd]))

    def wait(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((f"sync_file_range {flags}", names[fd]))
        return 0

    monkeypatch.setattr(writeback.os, "open", opened)
    monkeypatch.setattr(writeback.os, "posix_fadvise", advise)
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [wait])
    for i in range(3):
        write(tmp_path / f"chunk{i}", 2 << 20)
    assert calls == [
        ("advise", "chunk0"),
        ("advise", "chunk1"),
        ("advise", "chunk2"),
        ("sync_file_range 7", "chunk0"),
        ("advise", "chunk0"),
    ]


def test_a_write_error_found_by_the_wait_is_kept_for_flush_naming_the_file(
    tmp_path: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block writing when an older file's error turns up is not to blame: nothing is
    raised there; flush reports the error, once."""
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [_fail_waits_for("chunk0")])
    for i in range(3):
        write(tmp_path / f"chunk{i}", 2 << 20)
    assert writeback.pending_bytes() == 2 * (2 << 20)  # chunk0 was checked, and left the list
    (error,) = writeback.flush(tmp_path)
    assert error.path == tmp_path / "chunk0" and error.marker is None and error.cleared
    assert error.message == f"writing {tmp_path / 'chunk0'} to disk failed: {os.strerror(5)}"
    assert writeback.pending_bytes() == 0 and writeback.flush(tmp_path) == []


def test_a_marker_that_cannot_be_deleted_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [_fail_waits_for("chunk")])
    (tmp_path / "chunk").write_bytes(b"x")
    (tmp_path / "marker").mkdir()  # unlink refuses a folder
    error = writeback._drop(tmp_path / "chunk", tmp_path / "marker")
    assert error is not None and not error.cleared and error.code == 5
    assert error.message.endswith(
        f"its block's marker {tmp_path / 'marker'} could not be cleared: delete it, then rerun"
    )


def test_flush_waits_for_a_check_another_thread_has_under_way(
    tmp_path: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chunk0's check is under way in one thread (taken off the pending list) when another
    flushes: the flush waits for it and reports its error."""
    import errno
    import threading

    release = threading.Event()
    waiting = threading.Event()

    def slow_then_failing(fd: int, offset: int, nbytes: int, flags: int) -> int:
        if "chunk0" in os.readlink(f"/proc/self/fd/{fd}"):
            waiting.set()
            release.wait(10)
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [slow_then_failing])
    write(tmp_path / "chunk0", 2 << 20)
    write(tmp_path / "chunk1", 2 << 20)
    writer = threading.Thread(target=write, args=(tmp_path / "chunk2", 2 << 20))
    writer.start()  # takes chunk0 off the list and waits for it
    assert waiting.wait(10)
    flushed: list = []
    flusher = threading.Thread(target=lambda: flushed.append(writeback.flush(tmp_path)))
    flusher.start()
    flusher.join(0.3)
    assert flusher.is_alive() and not flushed  # still waiting for chunk0's check
    release.set()
    writer.join(10)
    flusher.join(10)
    assert [error.path.name for error in flushed[0]] == ["chunk0"]


def test_a_refused_wait_falls_back_to_fdatasync(
    droppable: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def refused(fd: int, offset: int, nbytes: int, flags: int) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [refused])
    for i in range(3):
        write(droppable / f"chunk{i}", 2 << 20)
    assert writeback._SYNC_FILE_RANGE == [None]
    assert resident_pages(droppable / "chunk0") == 0


def test_a_jobs_blocks_stream_through_the_store(droppable: Path, small_lag: int) -> None:
    """write_block goes through WriteBehindStore: early blocks' chunks leave the cache, and the
    store reads back exactly what was written."""
    config, plan = linear_job(droppable)
    store = Path(config.output.store)
    assert plan.grid == (4, 1)
    rng = np.random.default_rng(0)
    written = []
    for i in range(4):
        result = rng.standard_normal((512, 1, 1024))  # float64: 4 MiB per block
        write_block(str(store), plan, i, 0, None, result)
        written.append(result)
    chunk = lambda i: store / plan.result_name / "c" / str(i) / "0"  # noqa: E731
    assert resident_pages(chunk(0)) == 0 and resident_pages(chunk(1)) == 0
    assert resident_pages(chunk(3)) > 0
    import zarr

    stored = zarr.open_group(str(store), mode="r")[plan.result_name][...]
    np.testing.assert_array_equal(stored, np.concatenate(written)[:, 0, :])


def test_the_store_is_a_local_store_for_zarr(tmp_path: Path) -> None:
    import zarr

    group = zarr.open_group(WriteBehindStore(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    array = group.create_array("a", shape=(4, 600_000), chunks=(1, 600_000), dtype="float32")
    array[...] = np.arange(2_400_000, dtype="float32").reshape(4, -1)
    reopened = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["a"][...]
    np.testing.assert_array_equal(reopened, np.arange(2_400_000, dtype="float32").reshape(4, -1))


def test_a_block_of_fill_values_is_still_written(tmp_path: Path) -> None:
    """Chunks are written without zarr's scan for the fill value: an all-NaN block (nan_policy:
    propagate) is stored as such, and the next job's reader sees NaN either way."""
    config = config_from_dict(
        job_config(str(tmp_path / "out.zarr"), output={"store": str(tmp_path / "out.zarr")})
    )
    job = open_output(prepare(config, calibrate=False))
    plan, store = job.plan, Path(config.output.store)
    rows = plan.block_rows(0)[1]
    nan = np.full((rows, 3, 5), np.nan)
    write_block(str(store), plan, 0, 0, np.full((rows, 3), np.nan), nan)
    assert (store / plan.result_name / "c" / "0" / "0" / "0").is_file()
    assert (store / "y" / "c" / "0" / "0").is_file()


def _fail_waits_for(fragment: str):
    """A sync_file_range that reports EIO for files whose path contains ``fragment``."""
    import errno

    def wait(fd: int, offset: int, nbytes: int, flags: int) -> int:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    return wait


def test_a_write_error_clears_the_marker_of_the_block_it_belongs_to(
    tmp_path: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block 0's chunk fails to reach the disk, found while block 1 writes: block 1 is done,
    block 0's marker (already set) is cleared, and flush names block 0's file."""
    import asyncio

    from jacrun.block import flush_writes
    from jacrun.store import read_markers

    config, plan = linear_job(tmp_path)
    store = str(config.output.store)
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [_fail_waits_for(f"{plan.result_name}/c/0/0")])
    result = np.ones((512, 1, 1024))
    write_block(store, plan, 0, 0, None, result)
    assert read_markers(store)[:, 0].tolist() == [True, False, False, False]
    write_block(store, plan, 1, 0, None, result)  # checks block 0's chunk
    assert read_markers(store)[:, 0].tolist() == [False, True, False, False]
    ((marker, reason),) = asyncio.run(flush_writes(store))
    assert marker == f"{store}/_blocks/c/0/0"
    assert re.fullmatch(r"writing .*/vjp/c/0/0 to disk failed: Input/output error", reason)


def test_flush_waits_for_one_stores_pending_files_and_reports_their_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from jacrun.block import flush_writes
    from jacrun.store import read_markers

    monkeypatch.setattr(writeback, "_pending", type(writeback._pending)())
    monkeypatch.setattr(writeback, "_pending_bytes", [0])
    monkeypatch.setattr(writeback, "_checking", [])
    monkeypatch.setattr(writeback, "_errors", type(writeback._errors)(maxlen=writeback.MAX_ERRORS))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config, plan = linear_job(tmp_path / "a")
    store = str(config.output.store)
    result = np.ones((512, 1, 1024))
    for i in range(4):
        write_block(store, plan, i, 0, None, result)
    other = write(tmp_path / "b" / "chunk", 2 << 20)  # another store's file: left pending
    assert writeback.pending_bytes() == 4 * (result.nbytes + 4) + len(other)  # each chunk ends in a CRC32C
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [_fail_waits_for(f"{plan.result_name}/c/2/0")])
    (marker, reason), *rest = asyncio.run(flush_writes(store))
    assert rest == [] and marker == f"{store}/_blocks/c/2/0"
    assert reason.endswith("vjp/c/2/0 to disk failed: Input/output error")
    assert read_markers(store)[:, 0].tolist() == [True, True, False, True]
    assert writeback.pending_bytes() == len(other)
    assert asyncio.run(flush_writes(store)) == []


@pytest.mark.parametrize("who_clears", ["worker", "runner", "nobody"])
def test_a_run_reports_blocks_whose_data_did_not_reach_the_disk_and_a_rerun_redoes_them(
    tmp_path: Path, scheduler_address: str, who_clears: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the cluster: the workers' disk 'fails' for block 1's chunk. The run fails naming it,
    with the other blocks done. Its marker is cleared by the worker, else by the runner, and a
    rerun finishes once the disk is back; if nobody can clear it, the run still fails and says
    which file to delete."""
    from distributed import Client

    import jacrun
    from jacrun import store

    config, _ = linear_job(tmp_path)
    wait = _fail_waits_for("vjp/c/1/0")
    worker_clears = who_clears == "worker"

    def break_disk() -> None:
        writeback._SYNC_FILE_RANGE[:] = [wait]
        if not worker_clears:
            writeback.__dict__.setdefault("_real_unmark", writeback._unmark)
            writeback._unmark = lambda marker: False

    def mend_disk() -> None:
        writeback._SYNC_FILE_RANGE[:] = [writeback._sync_file_range()]
        writeback._unmark = writeback.__dict__.pop("_real_unmark", writeback._unmark)

    def unmark_refused(path: str, block: tuple[int, int]) -> None:
        raise PermissionError(13, "Permission denied")

    if who_clears == "nobody":
        monkeypatch.setattr(store, "unmark_block", unmark_refused)
    with Client(scheduler_address, set_as_default=False) as client:
        client.run(break_disk)
        try:
            summary = jacrun.submit(config, scheduler=scheduler_address, progress=False)
        finally:
            client.run(mend_disk)
    (failure,) = summary.failures
    assert summary.status == "failed"
    assert re.fullmatch(r"block \(1, 0\) samples 512:1024: writing \S+/vjp/c/1/0 to disk failed: .*", failure)
    if who_clears == "nobody":
        assert summary.blocks_done == 4
        assert failure.endswith(
            f"could not be cleared ([Errno 13] Permission denied): delete {config.output.store}/_blocks/c/1/0, then rerun"
        )
        return
    assert summary.blocks_done == 3 and failure.endswith("its marker was cleared, so a rerun recomputes it")
    again = jacrun.submit(config, scheduler=scheduler_address, progress=False)
    assert again.status == "complete" and again.blocks_run == 1


def test_a_block_whose_own_chunk_failed_before_its_marker_fails_itself(
    tmp_path: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block 0's result chunk is checked while block 0 still writes (its 4 MiB y passes the
    lag): the error is block 0's, so block 0 fails before its marker; a retry that rewrites the
    chunk succeeds, and nothing stale is reported afterwards."""
    import asyncio

    from jacrun.block import flush_writes
    from jacrun.store import read_markers

    config, plan = linear_job(tmp_path, samples=1024, n_out=1024, save_outputs=True)
    store = config.output.store
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [_fail_waits_for("vjp/c/0/0")])
    y, result = np.ones((512, 1024)), np.ones((512, 1, 1024))  # 4 MiB each
    with pytest.raises(OSError, match=r"vjp/c/0/0 to disk failed: Input/output error$"):
        write_block(str(store), plan, 0, 0, y, result)
    assert not read_markers(store).any()
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [writeback._sync_file_range()])
    write_block(str(store), plan, 0, 0, y, result)  # the retry
    assert read_markers(store)[:, 0].tolist() == [True, False]
    assert asyncio.run(flush_writes(str(store))) == []


def test_an_error_for_a_file_rewritten_since_is_not_reported(
    tmp_path: Path, small_lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error kept from an interrupted run is dropped once a rerun has rewritten the file."""
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [_fail_waits_for("chunk0")])
    for i in range(3):
        write(tmp_path / f"chunk{i}", 2 << 20)
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", [writeback._sync_file_range()])
    replacement = tmp_path / "chunk0.partial"
    replacement.write_bytes(os.urandom(1024))
    replacement.replace(tmp_path / "chunk0")  # how zarr rewrites a chunk: a new file
    assert writeback.flush(tmp_path) == []
