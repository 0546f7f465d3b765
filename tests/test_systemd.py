"""The systemd side: the notify protocol on a real datagram socket, the unit's security rating and
syntax, and the install script in a throw-away root (systemd itself does not run here)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import Broker
from conftest import IMAGES, MODELS, ROOT
from notify_socket import NotifySocket

UNIT = ROOT / "systemd" / "edgecam.service"
INSTALL = ROOT / "systemd" / "install.sh"


def test_notify_ready_watchdog_status_stopping(broker: Broker, daemons, tmp_path: Path, model_cache: Path) -> None:
    sock = NotifySocket(tmp_path / "notify.sock", poll=0.5)
    env = {"NOTIFY_SOCKET": str(sock.path), "WATCHDOG_USEC": "1000000"}  # ping every 0.5 s
    d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", broker.address, "--device-id", "dev-n", env=env)
    messages, receive = sock.messages, sock.receive

    def ready() -> list[dict[str, str]]:
        return [m for m in messages if m.get("READY") == "1"]

    try:
        # Start-up (imports, model, source) takes its own time on a busy machine; count from READY.
        receive(time.monotonic() + 90, lambda: bool(ready()))
        assert ready(), (messages, d.log())
        first = len(messages) - 1
        receive(time.monotonic() + 10)
        assert len(ready()) == 1, messages
        assert ready()[0]["MAINPID"] == str(d.proc.pid)
        pings = [m for m in messages[first:] if m.get("WATCHDOG") == "1"]
        # Every half WatchdogSec from the frame loop: about 20 in 10 s, never far fewer.
        assert len(pings) >= 10, len(pings)

        def connected() -> bool:
            return any("fps" in m.get("STATUS", "") and "connected" in m["STATUS"] for m in messages)

        receive(time.monotonic() + 30, connected)
        assert connected(), messages
        d.proc.send_signal(signal.SIGTERM)
        receive(time.monotonic() + 5)
        assert d.wait(30) == 0
        assert any(m.get("STOPPING") == "1" for m in messages)
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    from edgecam.device.notify import Notifier

    n = Notifier({})
    assert not n.active and n.watchdog_interval == 0
    n.ready("x")
    n.watchdog()  # no socket: nothing happens, nothing raises
    # The abstract namespace: '@' becomes a leading NUL.
    assert Notifier({"NOTIFY_SOCKET": "@/org/test"}).address == "\0/org/test"
    # WATCHDOG_PID for another process: not ours to ping.
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval == 0


def test_reload_and_ready_feed_the_watchdog(tmp_path: Path) -> None:
    """A reload restarts the process in place (drain, exec, imports, model load); the lab saw that take
    over WatchdogSec under emulation, and systemd killed a healthy daemon. RELOADING and READY ping."""
    from edgecam.device.notify import Notifier

    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(5)

        def sent(n: Notifier, call: Callable[[Notifier], None]) -> dict[str, str]:
            call(n)
            return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())

        on = Notifier({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "30000000"})
        off = Notifier({"NOTIFY_SOCKET": str(sock_path)})
        assert sent(on, lambda n: n.reloading()) == {"RELOADING": "1", "STATUS": "reloading the configuration",
                                                     "WATCHDOG": "1"}
        ready = sent(on, lambda n: n.ready("ok"))
        assert ready["READY"] == "1" and ready["WATCHDOG"] == "1"
        assert "WATCHDOG" not in sent(off, lambda n: n.reloading())
        assert "WATCHDOG" not in sent(off, lambda n: n.ready("ok"))


def test_unit_security_rating_is_ok() -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here (Debian package systemd)")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    line = proc.stdout.strip().splitlines()[-1]
    assert "Overall exposure level" in line, proc.stdout + proc.stderr
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.5, line


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL), "--prefix", str(root), "--mirror", str(MODELS), *args],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": shutil.which("python3") or "python3"},
    )


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: type, mode, size, mtime, link target."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        link = os.readlink(p) if p.is_symlink() else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, link)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    proc = install(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_install_lays_out_a_service(installed: Path) -> None:
    root = installed
    unit = root / "etc/systemd/system/edgecam.service"
    assert unit.read_text() == UNIT.read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/edgecam.service"
    assert os.readlink(wants) == "/etc/systemd/system/edgecam.service"
    edgecam = root / "opt/edgecam/venv/bin/edgecam"
    version = subprocess.run([str(edgecam), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("edgecam ")
    model = root / "opt/edgecam/models/tf2_mobilenet_v2_1.0_224_ptq/tf2_mobilenet_v2_1.0_224_ptq.tflite"
    assert model.read_bytes() == (MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite").read_bytes()
    conf = root / "etc/edgecam/edgecam.toml"
    assert all(not line.strip() or line.startswith(("#", "[")) for line in conf.read_text().splitlines())
    env = root / "etc/edgecam/edgecam.env"
    assert env.stat().st_mode & 0o777 == 0o600 and env.stat().st_uid == os.getuid()
    # The config it wrote is valid for the installed edgecam.
    check = subprocess.run([str(edgecam), "config", "check", "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_unit_verifies_against_the_installed_tree(installed: Path, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here (Debian package systemd)")
    # verify checks that ExecStart exists: point it at the throw-away root's copy.
    unit = tmp_path / "edgecam.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgecam/", f"{installed}/opt/edgecam/"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_install_twice_changes_nothing_and_keeps_edits(installed: Path) -> None:
    conf = installed / "etc/edgecam/edgecam.toml"
    conf.write_text(conf.read_text() + '\ndevice_id = "site-7"\n')
    env = installed / "etc/edgecam/edgecam.env"
    env.write_text("EDGECAM_MQTT_PASSWORD=kept\n")
    before = snapshot(installed)
    proc = install(installed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot(installed) == before
    assert 'device_id = "site-7"' in conf.read_text() and env.read_text() == "EDGECAM_MQTT_PASSWORD=kept\n"


def test_uninstall_keeps_config_and_state_unless_purged(installed: Path) -> None:
    state = installed / "var/lib/edgecam"
    state.mkdir(parents=True)
    (state / "spool-x.db").write_bytes(b"spool")
    proc = subprocess.run(["bash", str(INSTALL), "--prefix", str(installed), "--uninstall"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    files = sorted(str(p.relative_to(installed)) for p in installed.rglob("*") if not p.is_dir())
    assert files == ["etc/edgecam/edgecam.env", "etc/edgecam/edgecam.toml", "var/lib/edgecam/spool-x.db"]
    proc = subprocess.run(["bash", str(INSTALL), "--prefix", str(installed), "--uninstall", "--purge"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [p for p in installed.rglob("*") if not p.is_dir()] == []


def test_install_refuses_bad_options(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "install.sh: unknown option --frobnicate (see --help)"
    proc = subprocess.run(["bash", str(INSTALL), "--purge", "--prefix", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--purge goes with --uninstall" in proc.stderr
