"""Reloads in quick succession (two `systemctl reload`s): a real `edgecam run`, real signals, a real Mosquitto."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from broker import Broker, Recorder
from conftest import IMAGES, ROOT, wait_until

pytestmark = pytest.mark.usefixtures("model_cache")


def status(pid: int) -> tuple[int, int]:
    """Threads and resident kB of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def reloads(d) -> int:  # type: ignore[no-untyped-def]
    return d.log().count("SIGHUP: reloading")


def boots(rec: Recorder) -> set[str]:
    return {r["boot"] for r in rec.results()}


@pytest.mark.parametrize("delays", [(0.0, 0.1), (0.3, 0.6)])
def test_a_second_sighup_right_after_the_re_exec_reloads_again(broker: Broker, daemons,
                                                              delays: tuple[float, ...]) -> None:
    """The second signal lands in the new process before it has a handler (while it imports, one
    thread): it must be held until the handler is there, not kill the process."""
    rec = Recorder(broker.port, "edgecam/dev-hh/#")
    d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", broker.address, "--device-id", "dev-hh")
    assert rec.wait_for(lambda m: any(t.endswith("/result") for t, _, _ in m), 90), d.log()
    for i, delay in enumerate(delays):
        n_threads, rss = status(d.proc.pid)
        assert n_threads > 1  # the running daemon: paho, capture and interpreter threads
        d.proc.send_signal(signal.SIGHUP)

        def re_executed(rss: int = rss) -> bool:
            # The new program starts with one thread and a fraction of the memory, importing.
            n, kb = status(d.proc.pid)
            return n == 1 or kb < rss / 3

        assert wait_until(lambda: d.proc.poll() is not None or re_executed(), 60, 0.001), d.log()
        assert d.proc.poll() is None, d.log()
        time.sleep(delay)  # the stimulus: where in the new process's start the second signal lands
        d.proc.send_signal(signal.SIGHUP)
        # Each signal is one reload: the second is held until the new process can handle it (on a
        # loaded machine it may come after the handler is in place: a plain reload then).
        want = 2 * (i + 1)
        assert wait_until(lambda want=want: d.proc.poll() is not None or reloads(d) >= want, 90, 0.05), d.log()
        assert d.proc.poll() is None, (d.proc.returncode, d.log())
        assert reloads(d) == want, d.log()
        # It keeps running: results of the boot after the second reload arrive.
        seen = boots(rec)
        assert rec.wait_for(lambda _m, seen=seen: bool(boots(rec) - seen) or d.proc.poll() is not None, 90), d.log()
        assert d.proc.poll() is None, (d.proc.returncode, d.log())
    count = len(rec.results())
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= count + 3, 60), d.log()
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    assert "Traceback" not in d.log()
    rec.close()


def test_the_unit_restarts_a_daemon_killed_by_a_signal() -> None:
    """systemd counts a death by SIGHUP, SIGINT, SIGTERM or SIGPIPE as a clean exit, which
    Restart=on-failure leaves dead; the unit must force a restart for those."""
    unit = (ROOT / "systemd" / "edgecam.service").read_text()
    forced = [line.split("=", 1)[1].split() for line in unit.splitlines() if line.startswith("RestartForceExitStatus=")]
    assert forced, "no RestartForceExitStatus= in the unit"
    assert {"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"} <= {s for line in forced for s in line}


@pytest.mark.parametrize("order", ["hup-term", "term-hup", "term-in-the-re-exec"])
def test_a_stop_near_a_reload_stops_the_daemon(broker: Broker, daemons, order: str) -> None:
    """`systemctl reload` and `systemctl stop` close together: the stop wins, whichever came first.
    A SIGTERM caught while the reload's check ran, or before it, used to be forgotten by the exec
    (the daemon ran on, until systemd's SIGKILL); one landing in the new process before it had a
    handler killed it by the signal."""
    rec = Recorder(broker.port, "edgecam/dev-st/#")
    d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", broker.address, "--device-id", "dev-st")
    assert rec.wait_for(lambda m: any(t.endswith("/result") for t, _, _ in m), 90), d.log()
    if order == "hup-term":
        d.proc.send_signal(signal.SIGHUP)
        d.proc.send_signal(signal.SIGTERM)
    elif order == "term-hup":
        d.proc.send_signal(signal.SIGTERM)
        d.proc.send_signal(signal.SIGHUP)
    else:
        _, rss = status(d.proc.pid)
        d.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: d.proc.poll() is not None or status(d.proc.pid)[0] == 1
                          or status(d.proc.pid)[1] < rss / 3, 60, 0.001), d.log()
        d.proc.send_signal(signal.SIGTERM)
    try:
        code = d.wait(30)
    except Exception:
        pytest.fail(f"still running 30 s after SIGTERM: {d.log()}")
    assert code == 0, (code, d.log())
    assert "stopped after" in d.log(), d.log()
    assert "Traceback" not in d.log()
    rec.close()
