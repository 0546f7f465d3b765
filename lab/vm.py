"""The lab's moving parts on the host: a loopback Mosquitto, a QEMU guest, and an MQTT recorder.

Nothing here waits a fixed time for something to happen: every wait polls an observable state
(a TCP port answering, an ssh command succeeding, a message arriving) up to a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

# The guest reaches the broker at this address: a guestfwd, the only way out of restrict=on.
BROKER_IN_GUEST = "10.0.2.100"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """check()'s first truthy value, or TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


class Broker:
    """Mosquitto on 127.0.0.1:port, with persistence so a persistent session survives its restarts."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        # Mosquitto started by root drops to its own user, which must be able to save its state.
        store = workdir / "broker"
        store.mkdir(exist_ok=True)
        store.chmod(0o1777)
        workdir.chmod(0o755)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {store}/\nautosave_interval 1\n"
        )

    def up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def start(self) -> None:
        mosq = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else "mosquitto"
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen([mosq, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_until("mosquitto listening", self.up, 15, 0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Recorder:
    """Every message under a topic filter, kept in order; a persistent session (QoS 1) so that
    what the broker holds for us while we are away is delivered when we come back."""

    port: int
    topic: str = "edgecam/#"
    client_id: str = "edgecam-lab-recorder"
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False
        )
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(self.topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))

    def start(self) -> None:
        self.client.connect_async("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def since(self, t: float, suffix: str = "") -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m.at >= t and m.topic.endswith(suffix)]

    def wait(self, what: str, pred: Callable[[Message], bool], since: float, timeout: float) -> Message:
        def found() -> Message | None:
            return next((m for m in self.since(since) if pred(m)), None)

        return wait_until(what, found, timeout, 0.2)  # type: ignore[no-any-return]


class VM:
    """A QEMU guest booted from the lab's image: TCG, user-mode net with restrict=on."""

    def __init__(self, image: Path, payload: Path, workdir: Path, broker_port: int, smp: int = 2,
                 mem: int = 1536, qemu: str = "qemu-system-x86_64") -> None:
        self.image, self.payload, self.workdir = image, payload, workdir
        self.broker_port, self.smp, self.mem, self.qemu = broker_port, smp, mem, qemu
        self.ssh_port = free_port()
        self.key = image / "id_ed25519"
        self.disk = workdir / "root.qcow2"
        self.monitor = workdir / "monitor.sock"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def create_disk(self) -> None:
        """A copy-on-write layer over the cached image: each run starts from the same root."""
        self.disk.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image / "root.img"), str(self.disk)], check=True)

    def command(self) -> list[str]:
        # guestfwd's cmd: form starts one socat per connection, so the daemon can reconnect
        # after the broker went away; a tcp: chardev would connect only once, at start.
        fwd = f"guestfwd=tcp:{BROKER_IN_GUEST}:1883-cmd:socat - TCP:127.0.0.1:{self.broker_port}"
        net = f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,{fwd}"
        return [
            self.qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(self.smp), "-m", str(self.mem),
            "-display", "none", "-serial", f"file:{self.console}", "-no-user-config", "-nodefaults",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.show_status=false",
            "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=writeback",
            "-drive", f"file={self.payload},if=virtio,format=raw,readonly=on",
            "-netdev", net, "-device", "virtio-net-pci,netdev=n0",
            "-monitor", f"unix:{self.monitor},server,nowait",
        ]

    def start(self) -> None:
        log = open(self.workdir / "qemu.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ssh(self, cmd: str, timeout: float = 120, check: bool = False, input: bytes | None = None
            ) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", "-q", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6",
                "root@127.0.0.1", cmd]
        try:
            r = subprocess.run(argv, capture_output=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"guest command timed out after {timeout:.0f} s: {cmd}") from exc
        out = subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(errors="replace"),
                                          r.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise RuntimeError(f"guest: {cmd!r} exited {out.returncode}: {(out.stdout + out.stderr).strip()[-600:]}")
        return out

    def wait_ssh(self, timeout: float) -> None:
        def answered() -> bool:
            if not self.alive():
                raise RuntimeError(f"qemu exited: {(self.workdir / 'qemu.log').read_text()[-400:]}")
            try:
                return self.ssh("systemctl is-system-running --wait >/dev/null; true", timeout=60).returncode == 0
            except TimeoutError:
                return False

        wait_until("the guest's sshd and systemd up", answered, timeout, 1)

    def monitor_cmd(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.monitor))
            s.settimeout(5)
            s.sendall(line.encode() + b"\n")
            time.sleep(0.3)  # the human monitor has no framing; its echo is all we read
            try:
                return s.recv(65536).decode(errors="replace")
            except TimeoutError:
                return ""

    def reset(self) -> None:
        """The reset line: the guest's RAM (page cache included) is gone, the disk is as written."""
        self.monitor_cmd("system_reset")

    def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(TimeoutError):
            self.ssh("systemctl poweroff", timeout=10)
        assert self.proc is not None
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def q(s: str) -> str:
    return shlex.quote(s)
