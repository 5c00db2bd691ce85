"""One krona command per output: a live holder makes the next one stop with one line, a dead one's lock is taken
over, and the lock goes when its command ends (whatever way it ends)."""

import json
import socket
import subprocess
import sys

import pytest

from krona_cli.errors import KronaError
from krona_cli.lock import OutputLock, lock_path

pytestmark = pytest.mark.subprocess  # every test here starts krona or Python processes

HOLD = (
    "import sys, time; from krona_cli.lock import OutputLock\nwith OutputLock(sys.argv[1], 'krona test'):\n"
    "    print('held', flush=True); time.sleep(60)\n"
)


def test_a_live_holder_stops_the_next_command(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KronaError) as error:
            with OutputLock(tmp_path / "out", "krona train"):
                pytest.fail("took a held lock")
        message = str(error.value)
        assert "\n" not in message and "in use by `krona test`" in message and f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(gone.stdout), "host": socket.gethostname(), "command": "krona train", "started": "then"}
    lock_path(tmp_path / "out").write_text(json.dumps(record))
    with OutputLock(tmp_path / "out", "krona train") as lock:
        assert lock.took_over == record
        assert json.loads(lock_path(tmp_path / "out").read_text())["pid"] != record["pid"]
    assert not lock_path(tmp_path / "out").exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    lock_path(tmp_path / "out").write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "krona train"}))
    with pytest.raises(KronaError, match="on elsewhere"):
        with OutputLock(tmp_path / "out", "krona train"):
            pass


def test_the_lock_goes_with_an_error_and_is_free_again(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputLock(tmp_path / "out", "krona merge"):
            raise RuntimeError("boom")
    with OutputLock(tmp_path / "out", "krona merge") as lock:
        assert lock.took_over is None
