"""Benchmark attachment streaming (SPEC §14): encryption speed of the streaming recipe against
bare AESGCM on the same 64 KiB chunks (target >= 70 %), and memory that stays flat in the file's
size, measured on real uploads through the app.

Run from the repository root: `PYTHONPATH=src python bench/attachment_bench.py`. Writes
bench/results/attachments.json.

- Speed: `seal_stream` / `open_stream` (HKDF per stream, 64 KiB segments with position-bound
  nonces and associated data) against `AESGCM.encrypt` / `decrypt` of the same 64 KiB chunks with
  a fresh random nonce, as in bench/crypto_bench.py. Variants run interleaved, round after round;
  each ratio is the median of the per-round ratios.
- Memory, in-process: tracemalloc's peak while sealing then opening a 1 MiB and a 25 MiB stream.
- Memory, through the app: each upload runs in a fresh subprocess (`--child`) that migrates a new
  database, signs a patient in and streams a multipart upload, in 64 KiB pieces, through the real
  ASGI app (httpx.ASGITransport). One child per size reads `resource.getrusage().ru_maxrss`
  around the upload (no tracing, so the figure is the real resident peak); another measures
  tracemalloc's peak around the upload call alone. Sizes: 1 MiB and the largest file the 25 MiB
  upload limit lets through. On SQLite, and on PostgreSQL at PHIVAULT_TEST_DATABASE_URL when it
  answers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness import (  # type: ignore[import-not-found]
    PG,
    interleave,
    machine_info,
    pg_admin,
    ratio,
)
from phivault.crypto import stream
from phivault.crypto.envelope import Envelope, MasterKeyRing
from phivault.crypto.keys import KeyKind, generate_key, generate_key_line

RESULT = Path(__file__).parent / "results" / "attachments.json"
CHUNK = stream.SEGMENT_SIZE
STREAM_BYTES = 16 * 1024 * 1024
ROUNDS = 15
TARGET = 0.70
MIB = 1024 * 1024
SMALL = MIB
MAX_UPLOAD = 25 * MIB
# The 25 MiB limit is enforced on the whole request body (multipart envelope included), so the
# largest file that passes is a little under 25 MiB; the child tries exactly 25 MiB first.
ENVELOPE_ALLOWANCE = 1024
# Memory is "flat" when the big upload's peak is under this multiple of the small one's
# (proportional growth would be 25x).
FLAT_FACTOR = 2.0
PASSWORD = "attachment bench passphrase 2026"  # noqa: S105 - a throwaway bench account
BOUNDARY = "bench-boundary-3c9d1f0a7e"


# Speed.

def speed_variants() -> dict[str, Callable[[], object]]:
    env = Envelope(MasterKeyRing([("bench", generate_key())]))
    row_id = uuid.uuid4()
    dek = env.new_data_key(row_id)
    chunks = [os.urandom(CHUNK) for _ in range(STREAM_BYTES // CHUNK)]
    sealed = list(stream.seal_stream(dek, "attachments", "content", row_id, chunks))
    bare = AESGCM(generate_key())
    bare_sealed = [(nonce := os.urandom(12), bare.encrypt(nonce, c, None)) for c in chunks]
    urandom = os.urandom

    def seal() -> None:
        for _ in stream.seal_stream(dek, "attachments", "content", row_id, chunks):
            pass

    def bare_encrypt() -> None:
        for chunk in chunks:
            bare.encrypt(urandom(12), chunk, None)

    def open_() -> None:
        for _ in stream.open_stream(dek, "attachments", "content", row_id, sealed):
            pass

    def bare_decrypt() -> None:
        for nonce, chunk in bare_sealed:
            bare.decrypt(nonce, chunk, None)

    return {"seal": seal, "bare_encrypt": bare_encrypt, "open": open_,
            "bare_decrypt": bare_decrypt}


def traced_seal_open_peak(size: int) -> int:
    """tracemalloc's peak while sealing then opening `size` bytes fed in 64 KiB chunks."""
    env = Envelope(MasterKeyRing([("bench", generate_key())]))
    row_id = uuid.uuid4()
    dek = env.new_data_key(row_id)
    block = os.urandom(CHUNK)

    def source() -> Iterator[bytes]:
        for _ in range(size // CHUNK):
            yield block

    gc.collect()
    tracemalloc.start()
    sealed = stream.seal_stream(dek, "attachments", "content", row_id, source())
    total = sum(len(p) for p in stream.open_stream(dek, "attachments", "content", row_id, sealed))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if total != size:
        raise RuntimeError("stream round trip lost bytes")
    return peak


# One upload through the app, in a process of its own.

def file_head() -> bytes:
    return b"%PDF-1.7\n"


async def multipart_body(size: int) -> AsyncIterator[bytes]:
    """The multipart body of a `size`-byte PDF, made on the fly in 64 KiB pieces (the client
    never holds the file)."""
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"bench.pdf\"\r\nContent-Type: application/pdf\r\n\r\n").encode()
    block = os.urandom(CHUNK)
    head = file_head()
    sent = 0
    while sent < size:
        piece = block[:min(CHUNK, size - sent)]
        if sent == 0:
            piece = head + piece[len(head):]
        yield piece
        sent += len(piece)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def current_rss_kib() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


async def child(size: int, mode: str, database_url: str) -> dict[str, Any]:
    import httpx

    from phivault.config import load_settings
    from phivault.db.migrate import upgrade
    from phivault.runtime import Runtime
    from phivault.web.app import create_app

    settings = load_settings(
        database_url=database_url, master_keys=generate_key_line(KeyKind.MASTER),
        index_key=generate_key_line(KeyKind.INDEX), audit_key=generate_key_line(KeyKind.AUDIT),
        jwt_keys=generate_key_line(KeyKind.JWT), argon2_memory_kib=8, argon2_time_cost=1)
    rt = Runtime.from_settings(settings)
    try:
        await upgrade(rt.engine)
        email = f"bench.{uuid.uuid4().hex[:8]}@clinic.example"
        async with rt.unit_of_work() as session:
            user = await rt.accounts.create_with_password(session, email, "patient",
                                                          "Bench Patient", None, PASSWORD)
        async with rt.unit_of_work() as session:
            tokens = await rt.authenticator.login(session, email, PASSWORD, None)
        headers = {"Authorization": f"Bearer {tokens.access_token}",
                   "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        url = f"/api/v1/patients/{user.id}/attachments"
        transport = httpx.ASGITransport(app=create_app(runtime=rt))
        async with httpx.AsyncClient(transport=transport, base_url="https://bench") as client:
            warm = await client.post(url, headers=headers, content=multipart_body(4096))
            if warm.status_code != 201:
                raise RuntimeError(f"warm-up upload failed: {warm.status_code} {warm.text}")
            gc.collect()
            rss_before = current_rss_kib()
            maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if mode == "tracemalloc":
                tracemalloc.start()
            start = time.perf_counter()
            response = await client.post(url, headers=headers, content=multipart_body(size))
            seconds = time.perf_counter() - start
            traced_peak = tracemalloc.get_traced_memory()[1] if mode == "tracemalloc" else None
            tracemalloc.stop()
            maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            answer: dict[str, Any] = {"size": size, "status": response.status_code}
            if response.status_code != 201:
                return answer
            # Check the round trip (after the measurement: the test client buffers responses).
            got = await client.get(f"/api/v1/attachments/{response.json()['id']}",
                                   headers={"Authorization": headers["Authorization"]})
            if got.status_code != 200 or len(got.content) != size \
                    or not got.content.startswith(file_head()):
                raise RuntimeError("the upload did not come back intact")
            answer.update({
                "seconds": round(seconds, 3),
                "megabytes_per_second": round(size / 1e6 / seconds, 1),
                "rss_before_upload_kib": rss_before,
                "ru_maxrss_before_upload_kib": maxrss_before,
                "ru_maxrss_after_upload_kib": maxrss_after,
                "ru_maxrss_growth_kib": maxrss_after - maxrss_before,
                # ru_maxrss can lag the current RSS by a few pages: never below zero.
                "peak_over_rss_before_kib": max(0, maxrss_after - rss_before),
                "sha256_checked": hashlib.sha256(got.content).hexdigest()[:16],
            })
            if traced_peak is not None:
                answer["tracemalloc_peak_bytes"] = traced_peak
            return answer
    finally:
        await rt.close()


def run_child(size: int, mode: str, database_url: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent / "src"),
                                         str(Path(__file__).parent)])
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(size), "--mode", mode,
         "--database-url", database_url],
        capture_output=True, text=True, env=env, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def pg_reachable() -> bool:
    try:
        asyncio.run(pg_admin("SELECT 1"))
    except Exception:
        return False
    return True


def uploads_on(backend: str) -> dict[str, Any]:
    """The upload figures of one backend: each size and mode in a fresh process and database."""
    figures: dict[str, Any] = {}
    big = MAX_UPLOAD
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("1 MiB", SMALL), ("25 MiB", MAX_UPLOAD)):
            entry: dict[str, Any] = {}
            for mode in ("rss", "tracemalloc"):
                url = database_for(backend, tmp)
                try:
                    result = run_child(size if label == "1 MiB" else big, mode, url)
                    if result["status"] == 413 and label == "25 MiB":
                        entry["exactly_25_mib_status"] = 413
                        big = MAX_UPLOAD - ENVELOPE_ALLOWANCE
                        result = run_child(big, mode, url)
                finally:
                    drop_database(backend, url)
                entry[mode] = result
            figures[label] = entry
    return figures


_pg_names: dict[str, str] = {}


def database_for(backend: str, tmp: str) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp}/{uuid.uuid4().hex}.db"
    name = f"phivault_bench_att_{uuid.uuid4().hex[:8]}"
    asyncio.run(pg_admin(f'CREATE DATABASE "{name}"'))
    url = PG.rsplit("/", 1)[0] + "/" + name
    _pg_names[url] = name
    return url


def drop_database(backend: str, url: str) -> None:
    name = _pg_names.pop(url, None)
    if backend == "postgres" and name:
        asyncio.run(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def summarise(uploads: dict[str, Any]) -> dict[str, Any]:
    small, big = uploads["1 MiB"], uploads["25 MiB"]
    traced_small = small["tracemalloc"]["tracemalloc_peak_bytes"]
    traced_big = big["tracemalloc"]["tracemalloc_peak_bytes"]
    rss_small = max(small["rss"]["peak_over_rss_before_kib"], 1)
    rss_big = max(big["rss"]["peak_over_rss_before_kib"], 1)
    return {
        "upload_sizes_bytes": {"1 MiB": small["rss"]["size"], "25 MiB": big["rss"]["size"]},
        "ru_maxrss_kib": {"1 MiB": small["rss"]["ru_maxrss_after_upload_kib"],
                          "25 MiB": big["rss"]["ru_maxrss_after_upload_kib"]},
        "tracemalloc_peak_bytes": {"1 MiB": traced_small, "25 MiB": traced_big},
        "tracemalloc_peak_ratio_big_to_small": round(traced_big / traced_small, 2),
        "rss_peak_growth_kib": {"1 MiB": rss_small, "25 MiB": rss_big},
        "rss_peak_growth_ratio_big_to_small": round(rss_big / rss_small, 2),
        "flat_factor": FLAT_FACTOR,
        "memory_flat": traced_big <= FLAT_FACTOR * traced_small
        and rss_big <= FLAT_FACTOR * rss_small + 4096,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("rss", "tracemalloc"), default="rss",
                        help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(asyncio.run(child(args.child, args.mode, args.database_url))))
        return

    seconds = interleave(speed_variants(), ROUNDS)
    mb = STREAM_BYTES / 1e6
    rate = {name: round(mb / statistics.median(s), 1) for name, s in seconds.items()}
    seal_ratio = ratio(seconds, "seal", "bare_encrypt")
    open_ratio = ratio(seconds, "open", "bare_decrypt")
    in_process = {"1 MiB": traced_seal_open_peak(SMALL),
                  "25 MiB": traced_seal_open_peak(MAX_UPLOAD)}

    uploads: dict[str, Any] = {"sqlite": uploads_on("sqlite")}
    if pg_reachable():
        uploads["postgres"] = uploads_on("postgres")
    memory = {backend: summarise(figures) for backend, figures in uploads.items()}

    result = {
        "machine": machine_info(cryptography=cryptography.__version__),
        "command": "PYTHONPATH=src python bench/attachment_bench.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "method": (
            f"speed: {STREAM_BYTES // MIB} MiB in {CHUNK}-byte chunks, {ROUNDS} interleaved "
            "rounds, rates are medians over rounds, ratios medians of per-round ratios; bare = "
            "AESGCM(key).encrypt/decrypt of the same chunks with a fresh os.urandom(12) nonce. "
            "memory: see the module docstring"
        ),
        "stream_megabytes_per_second": rate,
        "seal_ratio_to_bare_aesgcm": seal_ratio,
        "open_ratio_to_bare_aesgcm": open_ratio,
        "target": TARGET,
        "meets_target": min(seal_ratio, open_ratio) >= TARGET,
        "memory": {
            "in_process_tracemalloc_peak_bytes_seal_then_open": in_process,
            "uploads_through_app": uploads,
            "summary": memory,
            "target": f"memory flat in file size: the 25 MiB upload's peaks within "
                      f"{FLAT_FACTOR}x the 1 MiB upload's",
            "meets_target": all(m["memory_flat"] for m in memory.values()),
        },
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
