"""A store that cannot be written: a full filesystem (a 1 MiB tmpfs with a ballast file) and a
read-only one. The node fails with a clear error naming the path (and, when full, the free
space and what the node needs), exit 2, no traceback, no staging folder and no DONE left;
after the fault is removed the same command completes.

The filesystems are mounted in a user + mount namespace (``unshare --user --map-root-user
--mount``: no root needed where unprivileged user namespaces are allowed); where they are
not, the test is skipped, saying so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_steps import expected_payload

HERE = Path(__file__).resolve().parent
CHUNKS = 64  # the writer node's payload: 64 x 4 KiB = 256 KiB

SCRIPT = r"""
set -u
S="$ROOT/store"; O="$ROOT/out"
mkdir -p "$S" "$O"
mount -t tmpfs -o size=1m tmpfs "$S"
run() { "$PY" "$HERE/engine_steps.py" --root "$S" --no-tracking --writer-chunks $CHUNKS \
        > "$O/$1.log" 2>&1; echo $? > "$O/$1.rc"; }
# full: ~200 KiB free for a 256 KiB payload
dd if=/dev/zero of="$S/ballast" bs=1k count=820 2>/dev/null
run full
(cd "$S" && find . -name 'DONE' -o -name '.tmp-*' | sort) > "$O/full.left"
rm "$S/ballast"
run freed
cp "$S"/t_writer/*/payload.bin "$O/payload.bin"
# read-only
umount "$S"; mount -t tmpfs -o size=4m tmpfs "$S"; mount -o remount,ro "$S"
run ro
mount -o remount,rw "$S"
(cd "$S" && find . | sort) > "$O/ro.left"
run rw
(cd "$S" && find . -name DONE | sort) > "$O/rw.done"
"""


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="no unprivileged user+mount namespaces here")
def test_full_and_read_only_store_fail_clearly_and_resume_after(tmp_path):
    env = {
        "ROOT": str(tmp_path),
        "PY": sys.executable,
        "HERE": str(HERE),
        "CHUNKS": str(CHUNKS),
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),  # this checkout's code
    }
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    store = tmp_path / "store"  # the path as the runs saw it

    full = (out / "full.log").read_text()
    assert (out / "full.rc").read_text().strip() == "2", full
    assert f"FAILED writer: no space left on device writing {store}/t_writer/.tmp-" in full
    assert "(0.0 MiB free on the store's filesystem)" in full
    assert "had written" in full and "when the disk filled up" in full
    assert f"hint: free space on {store}'s filesystem" in full
    assert "Traceback" not in full
    assert (out / "full.left").read_text() == ""  # no staging folder, no DONE

    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.log").read_text()
    payload = (out / "payload.bin").read_bytes()
    assert hashlib.sha256(payload).digest() == hashlib.sha256(expected_payload(CHUNKS)).digest()

    ro = (out / "ro.log").read_text()
    assert (out / "ro.rc").read_text().strip() == "2", ro
    # found before anything runs (a store that must be written and cannot)
    assert f"cannot write {store}: Read-only file system; 1 node(s) must be written" in ro
    assert "hint: make the store writable" in ro
    assert "Traceback" not in ro
    assert (out / "ro.left").read_text().split() == ["."]  # nothing was written
    assert (out / "rw.rc").read_text().strip() == "0", (out / "rw.log").read_text()
    assert len((out / "rw.done").read_text().split()) == 1
