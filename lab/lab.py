"""The device lab: edgecam installed as docs/install.md's Deploy section says, in a Debian trixie
VM with systemd as PID 1 and the kernel's vivid camera, checked from the host. One line per check.

    python lab/lab.py --image DIR --payload IMG --workdir DIR [--checks quick|all|NAME,...]

lab/run.sh builds the image and payload and calls this; see docs/lab.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
from vm import BROKER_IN_GUEST, VM, Broker, Message, Recorder, wait_until

from edgecam.contract import PayloadError, check_result, decode_cam

DEVICE = "lab-vivid"
PREFIX = f"edgecam/{DEVICE}/"
CONFIG = f"""# written by the edgecam lab, as a field engineer would (docs/install.md, Deploy, step 3)
device_id = "{DEVICE}"

[source]
kind = "opencv"
uri = "/dev/video0"

[model]
threads = 1

[loop]
# Under emulation a frame takes a while; one a second keeps the guest responsive.
max_fps = 1.0
stats_interval = 5.0

[mqtt]
host = "{BROKER_IN_GUEST}"
port = 1883
{{extra}}
"""
CONF_PATH = "/etc/edgecam/edgecam.toml"
QUICK = ["boot", "network", "install", "ready", "results", "sandbox", "reload", "watchdog", "camera_removed",
         "stop", "security", "journal"]
ALL = [*QUICK[:-3], "power_cut", "stop", "security", "journal", "install_twice", "uninstall", "picamera2"]


class Lab:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir)
        self.broker = Broker(self.workdir)
        self.rec = Recorder(self.broker.port)
        self.vm = VM(Path(args.image), Path(args.payload), self.workdir, self.broker.port, smp=args.smp)
        self.results: list[tuple[str, bool, str, float]] = []
        self.photo_size = (0, 0)  # the picamera2 check's photograph, (w, h), read on the host
        self.timings: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------
    def sh(self, cmd: str, timeout: float = 120) -> str:
        return self.vm.ssh(cmd, timeout=timeout, check=True).stdout

    def main_pid(self) -> int:
        return int(self.sh("systemctl show -p MainPID --value edgecam").strip() or 0)

    def mount_payload(self) -> None:
        """The run's payload disk at /lab (again after a reboot)."""
        self.sh("mountpoint -q /lab || mount -o ro /dev/vdb /lab")

    def write_config(self, extra: str = "") -> None:
        self.vm.ssh(f"cat > {CONF_PATH}", input=CONFIG.format(extra=extra).encode(), check=True)

    def result(self, since: float, what: str, pred: Callable[[dict], bool] = lambda r: True,
               timeout: float = 180) -> dict:
        def ok(m: Message) -> bool:
            if m.topic != PREFIX + "result":
                return False
            try:
                r = check_result(m.json())
            except (PayloadError, ValueError):
                return False
            return pred(r)

        return self.rec.wait(what, ok, since, timeout).json()  # type: ignore[no-any-return]

    def status(self, since: float, value: str, timeout: float = 120) -> Message:
        return self.rec.wait(f"status {value!r}", lambda m: m.topic == PREFIX + "status"
                             and m.payload == value.encode(), since, timeout)

    def journal(self, since_cursor: str = "") -> str:
        return self.vm.ssh("journalctl -u edgecam -o cat --no-pager", timeout=60).stdout

    # -- checks --------------------------------------------------------------------------------
    def check_boot(self) -> str:
        self.vm.create_disk()
        t0 = time.monotonic()
        self.vm.start()
        self.vm.wait_ssh(self.args.boot_timeout)
        self.timings["boot"] = time.monotonic() - t0
        pid1 = self.sh("cat /proc/1/comm").strip()
        state = self.sh("systemctl is-system-running || true").strip()
        kernel = self.sh("uname -r").strip()
        assert pid1 == "systemd", f"PID 1 is {pid1}"
        assert state in ("running", "degraded"), f"system state {state}"
        failed = self.sh("systemctl --failed --no-legend --plain | awk '{print $1}'").split()
        return f"systemd is PID 1 ({state}; failed units: {failed or 'none'}), kernel {kernel}, " \
               f"{self.timings['boot']:.0f} s to ssh"

    def check_network(self) -> str:
        # The broker forward answers; the host's loopback (through 10.0.2.2) and the world do not.
        probe = "timeout 5 bash -c '</dev/tcp/{}/{}' 2>/dev/null && echo open || echo closed"
        broker = self.sh(probe.format(BROKER_IN_GUEST, 1883)).strip()
        host = self.sh(probe.format("10.0.2.2", self.broker.port)).strip()
        world = self.sh(probe.format("151.101.2.132", 80)).strip()
        assert (broker, host, world) == ("open", "closed", "closed"), \
            f"broker forward {broker}, host loopback {host}, outside {world}"
        return "only the broker forward answers (host loopback and outside addresses do not)"

    def check_install(self) -> str:
        t0 = time.monotonic()
        self.mount_payload()
        self.sh("rm -rf /root/edgecam && mkdir /root/edgecam && tar -xf /lab/src.tar -C /root/edgecam")
        out = self.sh("cd /root/edgecam && bash systemd/install.sh --wheelhouse /lab/wheels --mirror /lab/models",
                      timeout=900)
        self.timings["install"] = time.monotonic() - t0
        self.install_log = out
        self.write_config()
        self.sh(f"/opt/edgecam/venv/bin/edgecam config check -c {CONF_PATH}", timeout=300)
        enabled = self.sh("systemctl is-enabled edgecam").strip()
        assert enabled == "enabled", f"edgecam.service is {enabled}"
        version = out.strip().splitlines()[-3] if len(out.strip().splitlines()) >= 3 else out.strip()
        return f"install.sh --wheelhouse --mirror in {self.timings['install']:.0f} s, unit enabled; {version}"

    def check_ready(self) -> str:
        # The camera's driver loads at boot, as a real camera's does.
        self.sh("echo vivid > /etc/modules-load.d/vivid.conf && modprobe vivid && udevadm settle")
        dev = self.sh("v4l2-ctl -d /dev/video0 --info | sed -n 's/.*Card type *: //p'").strip()
        self.rec.start()
        t0 = time.monotonic()
        self.t_start = t0
        # Type=notify: `systemctl start` returns only once READY=1 arrived (or fails).
        r = self.vm.ssh("systemctl start edgecam", timeout=300)
        self.timings["start_to_ready"] = time.monotonic() - t0
        assert r.returncode == 0, f"systemctl start failed: {r.stderr.strip()}"
        active = self.sh("systemctl is-active edgecam").strip()
        status = self.sh("systemctl show -p StatusText --value edgecam").strip()
        assert active == "active", f"unit is {active}"
        return f"active after READY in {self.timings['start_to_ready']:.0f} s on /dev/video0 ({dev}); STATUS={status!r}"

    def check_results(self) -> str:
        r = self.result(self.t_start, "a contract v1 result from the vivid camera", timeout=300)
        self.timings["first_result"] = time.monotonic() - self.t_start
        cam = decode_cam(r["cam"])
        assert r["device"] == DEVICE
        self.status(self.t_start, "online", 30)
        first = time.monotonic()
        self.result(first, "a second result", lambda x: x["seq"] > r["seq"], timeout=60)
        top = r["top"][0]
        self.timings["infer_ms"] = r["timing_ms"].get("infer", -1)
        return (f"timing_ms {r['timing_ms']}; boot {r['boot']} seq {r['seq']}: {top['label']} {top['score']}, "
                f"CAM {cam.shape[1]}x{cam.shape[0]} decoded; status online; "
                f"first result {self.timings['first_result']:.0f} s after start")

    def check_sandbox(self) -> str:
        pid = self.main_pid()
        props = self.sh("systemctl show -p DynamicUser,DevicePolicy,SupplementaryGroups,NoNewPrivileges edgecam")
        status = self.sh(f"grep -E '^(Uid|Groups):' /proc/{pid}/status")
        video = self.sh("getent group video | cut -d: -f3").strip()
        uid = int(status.split()[1])
        groups = status.split("Groups:")[1].split()
        fds = self.sh(f"readlink /proc/{pid}/task/*/fd/* 2>/dev/null | sort -u | grep -c '^/dev/video' || true").strip()
        assert "DevicePolicy=closed" in props and "DynamicUser=yes" in props, props
        assert uid >= 61184, f"uid {uid} is not a dynamic user"
        assert video in groups, f"not in the video group ({video}): {groups}"
        assert int(fds) >= 1, "the daemon does not hold /dev/video0 open"
        return f"uid {uid} (DynamicUser), groups {groups} incl. video, DevicePolicy=closed, holds /dev/video0"

    def check_reload(self) -> str:
        pid = self.main_pid()
        cfg = CONFIG.format(extra="").replace("stats_interval = 5.0", "stats_interval = 5.0\nheatmap_width = 14\n"
                                              "heatmap_height = 14")
        self.vm.ssh(f"cat > {CONF_PATH}", input=cfg.encode(), check=True)
        t0 = time.monotonic()
        self.sh("systemctl reload edgecam")
        r = self.result(t0, "a result with the reloaded 14x14 map", lambda x: x["cam"]["w"] == 14, timeout=240)
        assert self.main_pid() == pid, "the reload restarted the process (MainPID changed)"
        took = time.monotonic() - t0
        # A broken config: refused, the service keeps running on the old one.
        self.vm.ssh(f"cat > {CONF_PATH}", input=(cfg + '\n[spool]\nmax_mb = "lots"\n').encode(), check=True)
        t1 = time.monotonic()
        self.sh("systemctl reload edgecam")
        wait_until("the refusal in the journal", lambda: "configuration not reloaded" in self.journal(), 60, 1)
        r2 = self.result(t1, "a result after the refused reload", lambda x: x["seq"] > r["seq"], timeout=60)
        assert r2["cam"]["w"] == 14 and self.main_pid() == pid
        assert self.sh("systemctl is-active edgecam").strip() == "active"
        line = next(x for x in self.journal().splitlines() if "configuration not reloaded" in x)
        self.write_config()
        self.sh("systemctl reload edgecam")
        self.result(time.monotonic(), "a result with the raw map again", lambda x: x["cam"]["w"] != 14, 240)
        return f"heatmap 14x14 applied in {took:.0f} s, same PID; broken config refused: {line.strip()[:110]!r}"

    def check_watchdog(self) -> str:
        pid = self.main_pid()
        before = self.result(time.monotonic(), "a result before the freeze", timeout=180)
        restarts = int(self.sh("systemctl show -p NRestarts --value edgecam").strip())
        t0 = time.monotonic()
        self.sh(f"kill -STOP {pid}")
        r = self.result(t0, "a result from a new boot", lambda x: x["boot"] != before["boot"], timeout=300)
        took = time.monotonic() - t0
        log = self.vm.ssh("journalctl -u edgecam -o cat --no-pager | grep -i watchdog | tail -2").stdout.strip()
        now = int(self.sh("systemctl show -p NRestarts --value edgecam").strip())
        assert "watchdog" in log.lower() and now == restarts + 1, f"NRestarts {restarts}->{now}; {log!r}"
        return f"SIGSTOP'd PID {pid} killed by the watchdog; boot {before['boot']} -> {r['boot']} in {took:.0f} s"

    def check_camera_removed(self) -> str:
        # Unbinding the driver is a hot-unplug (as pulling a USB camera): the open node goes away.
        t0 = time.monotonic()
        self.sh("echo vivid.0 > /sys/bus/platform/drivers/vivid/unbind")
        self.status(t0, "degraded", 120)
        degraded_in = time.monotonic() - t0
        wait_until("rmmod vivid (the daemon lets the node go)",
                   lambda: self.vm.ssh("rmmod vivid").returncode == 0, 60, 1)
        t1 = time.monotonic()
        self.sh("modprobe vivid && udevadm settle")
        self.status(t1, "online", 180)
        self.result(t1, "a result after the camera came back", timeout=120)
        return f"unplug -> degraded in {degraded_in:.0f} s; rmmod ok; modprobe -> online with results in " \
               f"{time.monotonic() - t1:.0f} s"

    def spooled(self) -> list[tuple[str, int]]:
        """(boot, seq) of every result waiting in the spool, read by root beside the running daemon."""
        out = self.sh("""python3 -c '
import glob, json, sqlite3
db = sqlite3.connect(glob.glob("/var/lib/private/edgecam/spool-*.db")[0], timeout=10)
rows = db.execute("SELECT payload FROM outbox WHERE kind = ?", ("result",)).fetchall()
print(json.dumps([[json.loads(p)["boot"], json.loads(p)["seq"]] for (p,) in rows]))'""")
        return [(b, int(n)) for b, n in json.loads(out)]

    def check_power_cut(self) -> str:
        """A power cut while the broker is away: what was on disk arrives after the reboot, counted by
        boot and seq at a persistent subscriber; what was committed but not yet on disk is measured."""
        boot = self.result(time.monotonic(), "a result before the outage", timeout=120)["boot"]
        self.broker.stop()
        wait_until("5 results of this boot in the spool",
                   lambda: sum(b == boot for b, _ in self.spooled()) >= 5, 240, 2)
        # What `sync` has put on the disk is what a power cut cannot take: the results spooled before it
        # began (read first: those made while it ran, or after, may not be on the disk).
        durable = max(n for b, n in self.spooled() if b == boot)
        self.sh("sync")
        last = wait_until("3 more results after the sync",
                          lambda: (m := max(n for b, n in self.spooled() if b == boot)) >= durable + 3 and m, 120, 1)
        t_cut = time.monotonic()
        self.vm.reset()
        self.broker.start()
        self.vm.wait_ssh(self.args.boot_timeout)
        def old_boot() -> list[int]:
            return sorted({m.json()["seq"] for m in self.rec.since(0, "/result") if m.json()["boot"] == boot})

        # The spool is first in, first out: by the new boot's first result the old rows have gone out.
        new = self.result(t_cut, "a result from the boot after the power cut", lambda x: x["boot"] != boot, 600)
        got = old_boot()
        expected = set(range(got[0], durable + 1))
        missing = sorted(expected - set(got))
        lost = max(0, last - got[-1])
        holes = sorted(set(range(got[0], got[-1] + 1)) - set(got))
        self.timings["power_cut_lost"] = lost
        assert not missing, f"{len(missing)} results on disk before the cut never arrived: {missing[:10]}"
        assert not holes, f"holes in boot {boot}'s sequence: {holes[:10]}"
        # The new boot's stats count the gap: the last seq that survived, and a bound that covers every
        # seq the cut really took (those the spool had, above the last that arrived).
        prev = self.rec.wait("the new boot's stats telling how the old one ended", lambda m: m.topic == PREFIX + "stats"
                             and (m.json().get("previous") or {}).get("boot") == boot, t_cut, 120).json()["previous"]
        gap = range(prev["last_seq"] + 1, prev["last_seq"] + prev["lost_at_most"] + 1)
        assert prev["end"] == "power_cut", f"previous run reported as {prev}"
        assert prev["last_seq"] == got[-1], f"stats say seq {prev['last_seq']} survived, {got[-1]} arrived"
        uncounted = [n for n in range(got[-1] + 1, last + 1) if n not in gap]
        assert not uncounted, f"seqs lost outside the counted gap {prev}: {uncounted}"
        self.timings["power_cut_counted"] = prev["lost_at_most"]
        return (f"boot {boot}: seq {got[0]}..{got[-1]} all arrived (on disk at the sync: ..{durable}); "
                f"{lost} result(s) committed after the sync but lost to the cut (spool had ..{last}); "
                f"then boot {new['boot']}, whose stats count the gap: up to {prev['lost_at_most']} lost "
                f"after seq {prev['last_seq']}")

    def check_stop(self) -> str:
        t0 = time.monotonic()
        self.sh("systemctl stop edgecam", timeout=120)
        m = self.status(t0, "offline", 30)
        state = self.vm.ssh("systemctl is-active edgecam").stdout.strip()
        assert state == "inactive", f"unit is {state}"
        return f"status offline (retained={m.retain}) {m.at - t0:.1f} s after stop; unit inactive"

    def check_security(self) -> str:
        out = self.sh("systemd-analyze security --no-pager edgecam.service | tail -1")
        m = re.search(r"exposure level for edgecam.service:\s*([\d.]+)\s*(\S+)", out)
        assert m, out
        assert float(m.group(1)) <= 2.5, out.strip()
        return f"systemd-analyze security on the live system: {m.group(1)} {m.group(2)}"

    def check_journal(self) -> str:
        text = self.journal()
        bad = [x for x in text.splitlines() if "Traceback" in x]
        assert not bad, f"{len(bad)} traceback(s): {bad[:2]}"
        # XNNPACK's CPU detection needs /proc/cpuinfo, which ProcSubset=pid hid (fixed in the unit).
        cpuinfo = [x for x in text.splitlines() if "Error in cpuinfo" in x]
        assert not cpuinfo, cpuinfo[0]
        return f"{len(text.splitlines())} journal lines for edgecam, no traceback"

    def check_picamera2(self) -> str:
        """picamera2 from PyPI over trixie's libcamera 0.4 and its virtual camera playing a shared photograph;
        edgecam's adapter captures a frame, then the service runs with source.kind = "picamera2": its top-1
        and map against `edgecam explain` on the captured frame and on the photograph."""
        photo, (pw, ph) = self.args.photo, self.photo_size
        site = "/usr/local/lib/python3.13/dist-packages"
        # As `sudo pip install --break-system-packages picamera2` would: into the system's dist-packages,
        # its compiled dependencies from Debian (python3-libcamera, -prctl, -av, -pil, -numpy, ...).
        self.mount_payload()
        self.sh(f"python3 -m venv /root/pip && /root/pip/bin/pip install -q --no-index --no-deps "
                f"--find-links /lab/wheels-picamera2 --target {site} "
                "picamera2 videodev2 simplejpeg openexr pidng", timeout=600)
        # What a Pi has and this guest lacks (lab/picamera2_virtual.py says why, one by one).
        self.sh(f"python3 /root/edgecam/lab/picamera2_virtual.py prepare {site}")
        # Raspberry Pi OS gives the video group the DMA heaps and calls its CMA heap linux,cma, which
        # picamera2 allocates from; this kernel has only the system heap (no CMA), same ioctl.
        # (udev's SYMLINK+= would turn the comma into an underscore.)
        rule = ('SUBSYSTEM=="dma_heap", KERNEL=="system", GROUP="video", MODE="0660", '
                'RUN+="/bin/ln -sfn system /dev/dma_heap/linux,cma"')
        self.vm.ssh("cat > /etc/udev/rules.d/70-edgecam-lab-dma-heap.rules", input=rule.encode() + b"\n", check=True)
        self.sh("udevadm control --reload && udevadm trigger -s dma_heap && udevadm settle && "
                "test -e '/dev/dma_heap/linux,cma'")
        self.sh(f"install -d -m 0755 /srv/frames && install -m 0644 /lab/images/{photo} /srv/frames/{photo}")
        # The camera's one mode is the photograph's own size, so libcamera does not resample it.
        yaml = (f'"Virtual0":\n  supported_formats:\n  - width: {pw}\n    height: {ph}\n'
                f'  frames:\n    path: "/srv/frames/{photo}"\n  model: "Virtual Video Device"\n')
        self.sh("install -d /usr/share/libcamera/pipeline/virtual")
        self.vm.ssh("cat > /usr/share/libcamera/pipeline/virtual/virtual.yaml", input=yaml.encode(), check=True)
        cams = self.vm.ssh("cam -l 2>&1", timeout=120).stdout
        assert "(Virtual0)" in cams, f"cam -l: {' '.join(cams.split())[-300:]}"
        # The service, reinstalled: install.sh sees the system's picamera2 and makes a --system-site-packages venv.
        self.sh("systemctl stop edgecam; cd /root/edgecam && bash systemd/install.sh --uninstall && "
                "bash systemd/install.sh --wheelhouse /lab/wheels --mirror /lab/models", timeout=900)
        venv = self.sh("grep -c 'include-system-site-packages = true' /opt/edgecam/venv/pyvenv.cfg || true").strip()
        assert venv == "1", "install.sh did not make a --system-site-packages venv beside the system's picamera2"
        probe = self.sh("cd /root/edgecam && timeout 300 /opt/edgecam/venv/bin/python lab/picamera2_virtual.py "
                        "probe /srv/frames/captured.png 2>/dev/null", timeout=330).strip()
        cfg = CONFIG.format(extra="").replace('kind = "opencv"\nuri = "/dev/video0"', 'kind = "picamera2"')
        self.vm.ssh(f"cat > {CONF_PATH}", input=cfg.encode(), check=True)
        t0 = time.monotonic()
        self.sh("systemctl start edgecam", timeout=300)
        r = self.result(t0, "a result from picamera2", timeout=300)
        self.sh("systemctl stop edgecam", timeout=120)

        def explain(path: str) -> dict:
            out = self.sh(f"EDGECAM_MODEL_DIR=/opt/edgecam/models /opt/edgecam/venv/bin/edgecam explain {path} "
                          "--top 1 --json", timeout=300)
            return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

        got, cam = r["top"][0], decode_cam(r["cam"])
        step = (r["cam"]["max"] - r["cam"]["min"]) / 255
        lines = []
        for name, path in (("the captured frame", "/srv/frames/captured.png"), (photo, f"/srv/frames/{photo}")):
            want = explain(path)
            top, ref = want["top"][0], np.asarray(want["cams"][0]["map"], np.float32)
            assert got["id"] == top["id"], f"service top-1 {got['label']!r}; explain on {name}: {top['label']!r}"
            assert ref.shape == cam.shape, f"maps {cam.shape} and {ref.shape}"
            corr = float(np.corrcoef(cam.ravel(), ref.ravel())[0, 1])
            diff = float(np.abs(cam - ref).max())
            lines.append(f"{name}: {top['label'].split(',')[0]} {top['score']}, map max diff {diff:.2f} "
                         f"(step {step:.2f}), r={corr:.3f}")
            # The captured frame is what the service saw: the same map but for the contract's 8-bit encoding
            # and the daemon's resize path; the photograph went through the camera's NV12 and its decoder.
            assert diff <= step + 1e-3 if name == "the captured frame" else corr >= 0.9, lines[-1]
        return (f"{' | '.join(probe.splitlines())}; service top-1 {got['label'].split(',')[0]} {got['score']}; "
                f"explain on {'; '.join(lines)}")

    def tree(self) -> str:
        """Every installed file's path, size, mode, time and content hash: what 'changes nothing' compares."""
        return self.sh("find /opt/edgecam /etc/edgecam /etc/systemd/system/edgecam.service "
                       "/etc/systemd/system/multi-user.target.wants/edgecam.service -printf '%p %s %m %T@ %l\\n' "
                       "| LC_ALL=C sort | sha256sum; find /opt/edgecam /etc/edgecam -type f -print0 "
                       "| LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum", timeout=300)

    def check_install_twice(self) -> str:
        self.mount_payload()
        self.sh("systemctl start edgecam", timeout=300)
        pid = self.main_pid()
        before = self.tree()
        t0 = time.monotonic()
        out = self.sh("cd /root/edgecam && bash systemd/install.sh --wheelhouse /lab/wheels --mirror /lab/models",
                      timeout=900)
        took = time.monotonic() - t0
        after = self.tree()
        said = [x for x in out.splitlines() if any(w in x for w in ("installing", "wrote", "installed", "creating"))]
        assert before == after, "the second install changed installed files"
        assert not said, f"the second install did something: {said}"
        assert self.main_pid() == pid, "the running service was restarted"
        return f"second install.sh in {took:.0f} s: no file changed, service not restarted (PID {pid})"

    def check_uninstall(self) -> str:
        self.sh("cd /root/edgecam && bash systemd/install.sh --uninstall", timeout=300)
        gone = self.sh("for p in /opt/edgecam /etc/systemd/system/edgecam.service; do [ -e $p ] && echo $p; done; true")
        kept = self.sh("ls /etc/edgecam/edgecam.toml /etc/edgecam/edgecam.env; ls -d /var/lib/private/edgecam")
        spool = self.sh("ls /var/lib/private/edgecam").split()
        active = self.vm.ssh("systemctl is-active edgecam").stdout.strip()
        assert not gone.strip(), f"left behind: {gone.split()}"
        assert any(f.startswith("spool-") for f in spool), f"no spool in the kept state: {spool}"
        assert active in ("inactive", "unknown"), f"unit is {active}"
        return f"unit and /opt/edgecam removed; kept {' '.join(kept.split())} ({', '.join(spool)})"

    def save_diagnostics(self) -> None:
        """The guest's journal and every message the host saw, beside the run's other logs."""
        try:
            if self.vm.alive():
                text = self.vm.ssh("journalctl -o short-monotonic --no-pager", timeout=120).stdout
                (self.workdir / "journal.txt").write_text(text)
        except Exception as exc:  # diagnostics must not hide the checks' own outcome
            print(f"lab: could not save the guest journal: {exc}", file=sys.stderr)
        with self.rec.lock, open(self.workdir / "messages.txt", "w") as f:
            for m in self.rec.messages:
                f.write(f"{m.at:.1f} {m.topic} {'R ' if m.retain else ''}{m.payload[:300]!r}\n")

    # -- running -------------------------------------------------------------------------------
    def run(self, names: list[str]) -> int:
        self.broker.start()
        blocked = ""
        try:
            for name in names:
                t0 = time.monotonic()
                if blocked:
                    self.results.append((name, False, f"not run: {blocked}", 0.0))
                    print(f"FAIL {name}: not run: {blocked}", flush=True)
                    continue
                try:
                    detail = getattr(self, f"check_{name}")()
                    ok = True
                except Exception as exc:  # a check's failure is its line, not the end of the lab
                    ok, detail = False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
                    (self.workdir / f"{name}.traceback").write_text(traceback.format_exc())
                    if name in ("boot", "install", "ready"):
                        blocked = f"{name} failed"
                took = time.monotonic() - t0
                self.results.append((name, ok, detail, took))
                print(f"{'PASS' if ok else 'FAIL'} {name} ({took:.0f} s): {detail}", flush=True)
        finally:
            self.save_diagnostics()
            try:
                self.vm.stop()
            finally:
                self.rec.stop()
                self.broker.stop()
        failed = [n for n, ok, _, _ in self.results if not ok]
        passed = len(self.results) - len(failed)
        print(f"lab: {passed} passed, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
        return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True)
    ap.add_argument("--payload", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--checks", default="all")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--photo", default="cat_720p.jpg", help="the JPEG libcamera's virtual camera plays (even size)")
    ap.add_argument("--boot-timeout", type=float, default=600)
    ap.add_argument("--payload-images", default="", help="the photographs on the host (for the picamera2 check)")
    args = ap.parse_args()
    names = {"all": ALL, "quick": QUICK}.get(args.checks) or args.checks.split(",")
    unknown = [n for n in names if not hasattr(Lab, f"check_{n}")]
    if unknown:
        print(f"lab: unknown check(s) {', '.join(unknown)}; known: {', '.join(ALL)}", file=sys.stderr)
        return 2
    lab = Lab(args)
    if "picamera2" in names:
        image = cv2.imread(str(Path(args.payload_images) / args.photo)) if args.payload_images else None
        if image is None or not args.photo.lower().endswith((".jpg", ".jpeg")):
            print(f"lab: --photo {args.photo}: not a JPEG in {args.payload_images}", file=sys.stderr)
            return 2
        lab.photo_size = (image.shape[1], image.shape[0])
        if image.shape[0] % 2 or image.shape[1] % 2:
            # libcamera 0.4.0 sizes the chroma plane of a played JPEG as w*h/2 and libyuv writes
            # ceil(h/2) rows of it: an odd height overruns the heap ("malloc(): corrupted top size").
            print(f"lab: --photo {args.photo} is {image.shape[1]}x{image.shape[0]}: libcamera 0.4.0's virtual "
                  "camera corrupts its heap on a JPEG of odd width or height; give an even-sized one", file=sys.stderr)
            return 2
    return lab.run(names)


if __name__ == "__main__":
    sys.exit(main())
