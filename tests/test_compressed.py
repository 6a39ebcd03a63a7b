"""Compressed JSON text as it arrives from the wild (issue 22, finding 9): a file cut short (a broken download) stops
the run with an error naming it, whatever the codec; zstd frames with `--long` windows (Pushshift-style dumps) read.

Every file is written by the codec's own library or CLI; the cut copies keep the first 43% of the compressed bytes,
as the report's broken download did (57% of the rows missing).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import shutil
import subprocess

import pytest
import zstandard

from drift_stream.engines.local import RunConfig, run_score
from drift_stream.errors import InputError
from drift_stream.io.streams import expand_inputs, iter_chunks, plan_inputs

ROWS = 3000
KEEP = 0.43  # share of the compressed bytes a cut copy keeps


def lines(n: int = ROWS) -> bytes:
    """JSON Lines of `n` chat rows whose text varies, so that every codec needs many blocks for them."""
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Calculate {i} + {i * 7919 % 1009}."},
                                         {"role": "assistant", "content": f"{i + i * 7919 % 1009}"}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def zstd_frames(data: bytes, **params) -> bytes:
    """`data` as zstd written by a stream writer (no content size in the header, as `zstd` writes a pipe)."""
    out = io.BytesIO()
    compressor = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(**params)) \
        if params else zstandard.ZstdCompressor()
    with compressor.stream_writer(out, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


COMPRESSORS = {
    "jsonl.gz": gzip.compress,
    "jsonl.zst": lambda data: zstandard.ZstdCompressor().compress(data),
    "jsonl.bz2": bz2.compress,
    "jsonl.xz": lzma.compress,
}


def read_all(path: str) -> list[dict]:
    files = expand_inputs([path])
    plan = plan_inputs(files)
    return [row for chunk in iter_chunks(files[0], plan, 512) for row in chunk.table.to_pylist()]


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_every_codec_reads_whole_and_refuses_a_cut_copy_naming_it(tmp_path, suffix):
    whole = COMPRESSORS[suffix](lines())
    path = tmp_path / f"pool.{suffix}"
    path.write_bytes(whole)
    assert [r["id"] for r in read_all(str(path))] == [f"r{i}" for i in range(ROWS)]
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(whole[: int(len(whole) * KEEP)])
    with pytest.raises(InputError, match=r"cut\.jsonl\.\w+") as caught:
        read_all(str(cut))
    assert "cut short" in str(caught.value) or "cannot be read to the end" in str(caught.value)


def test_a_cut_zstd_file_of_many_frames_is_refused_but_a_whole_one_reads(tmp_path):
    """Frames end where one stream writer's input ended (`zstd` and pzstd write several); a cut between two frames
    is invisible to any reader, so the cut here falls inside the second frame."""
    data = lines()
    half = data.index(b"\n", len(data) // 2) + 1
    first, second = zstd_frames(data[:half]), zstd_frames(data[half:])
    (tmp_path / "two.jsonl.zst").write_bytes(first + second)
    assert len(read_all(str(tmp_path / "two.jsonl.zst"))) == ROWS
    (tmp_path / "cut.jsonl.zst").write_bytes(first + second[: len(second) // 2])
    with pytest.raises(InputError, match=r"cut\.jsonl\.zst.*cut short"):
        read_all(str(tmp_path / "cut.jsonl.zst"))


def test_a_cut_zstd_pool_stops_the_score_run_without_a_complete_manifest(tmp_path, tiny_model_dir):
    """The report's case end to end: before, exit 0 and `complete: true` with 57% of the rows missing."""
    from drift_stream.scoring.build import build_scorer

    whole = zstandard.ZstdCompressor().compress(lines())
    (tmp_path / "pool.jsonl.zst").write_bytes(whole[: int(len(whole) * KEEP)])
    scorer = build_scorer("random", model=tiny_model_dir, adapter="messages", seed=0)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"pool\.jsonl\.zst.*cut short"):
        run_score(RunConfig(data=(str(tmp_path / "pool.jsonl.zst"),), out=str(out)), scorer, progress=False)
    assert not (out / "manifest.json").exists() and not list((out / "completions").glob("*.json"))


@pytest.mark.parametrize("window_log", [28, 31])
def test_long_window_zstd_reads(tmp_path, window_log):
    """`zstd --long=31` frames declare a 2 GiB window; python-zstandard refuses above 128 MiB unless told."""
    data = lines(500)
    frames = zstd_frames(data, window_log=window_log, enable_ldm=True)
    assert zstandard.get_frame_parameters(frames).window_size == 1 << window_log
    with pytest.raises(zstandard.ZstdError, match="too much memory"):  # the library's default limit
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frames)).read()
    (tmp_path / "dump.jsonl.zst").write_bytes(frames)
    assert len(read_all(str(tmp_path / "dump.jsonl.zst"))) == 500


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd CLI is not installed")
def test_files_written_by_the_zstd_cli_with_long_31_read_and_cut_ones_are_refused(tmp_path):
    source = tmp_path / "dump.jsonl"
    source.write_bytes(lines())
    # from a pipe, as dumps are written: no content size in the header, so the window stays 2 GiB
    with open(source, "rb") as stdin, open(tmp_path / "dump.jsonl.zst", "wb") as stdout:
        subprocess.run(["zstd", "-q", "--long=31", "-c"], stdin=stdin, stdout=stdout, check=True)
    frames = (tmp_path / "dump.jsonl.zst").read_bytes()
    assert zstandard.get_frame_parameters(frames).window_size > 1 << 27
    assert len(read_all(str(tmp_path / "dump.jsonl.zst"))) == ROWS
    (tmp_path / "cut.jsonl.zst").write_bytes(frames[: int(len(frames) * KEEP)])
    with pytest.raises(InputError, match=r"cut\.jsonl\.zst.*cut short"):
        read_all(str(tmp_path / "cut.jsonl.zst"))
