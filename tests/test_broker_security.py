"""TLS, passwords and ACLs against a Mosquitto the test configures: certificates it makes with
openssl (a CA, a server certificate for localhost, a client certificate), a mosquitto_passwd file,
and an ACL that lets each device write only under its own prefix."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from broker import Broker, Recorder, free_port, publish
from conftest import IMAGES, one_error_line, run_cli, wait_until

pytestmark = pytest.mark.usefixtures("model_cache")

PASSWORDS = {"dev1": "s3cret-dev1", "dev2": "s3cret-dev2", "watcher": "s3cret-watch"}
ACL = """\
user dev1
topic readwrite edgecam/dev1/#
user dev2
topic readwrite edgecam/dev2/#
user watcher
topic read edgecam/#
topic write edgecam/+/cmd
"""


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _make_cert(d: Path, name: str, ca: str, cn: str, san: str | None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("openssl") or not shutil.which("mosquitto_passwd"):
        pytest.fail("openssl and mosquitto_passwd are needed (Debian packages openssl and mosquitto)")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "server", "ca", "localhost", "DNS:localhost")  # not valid for 127.0.0.1
    _make_cert(d, "client", "ca", "dev1", None)
    passwd = d / "passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    (d / "acl").write_text(ACL)
    (d / "not-a-cert.pem").write_text("hello\n")
    return d


def tls_broker(tmp_path: Path, pki: Path, require_cert: bool = False) -> Broker:
    listener = (
        f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
        f"tls_version tlsv1.2\nrequire_certificate {'true' if require_cert else 'false'}\n"
    )
    extra = f"password_file {pki / 'passwd'}\nacl_file {pki / 'acl'}\n"
    return Broker(tmp_path / "tls-broker", extra_conf=extra, listener_conf=listener, anonymous=False).start()


def env_for(pki: Path, user: str = "dev1", password: str | None = None, **more: str) -> dict[str, str]:
    return {
        "EDGECAM_MQTT_TLS": "true",
        "EDGECAM_MQTT_CA_FILE": str(pki / "ca.crt"),
        "EDGECAM_MQTT_USERNAME": user,
        "EDGECAM_MQTT_PASSWORD": PASSWORDS[user] if password is None else password,
        "EDGECAM_MQTT_RECONNECT_MIN": "1",
        "EDGECAM_MQTT_RECONNECT_MAX": "2",
        "EDGECAM_MQTT_SHUTDOWN_TIMEOUT": "2",
        **more,
    }


def watcher(b: Broker, pki: Path, topics: str = "edgecam/#") -> Recorder:
    return Recorder(b.port, topics, ca=pki / "ca.crt", auth=("watcher", PASSWORDS["watcher"]), host="localhost",
                    cert=(pki / "client.crt", pki / "client.key"))


def test_publishes_over_tls_with_a_password_and_takes_commands(tmp_path: Path, pki: Path, daemons) -> None:
    b = tls_broker(tmp_path, pki)
    try:
        rec = watcher(b, pki)
        d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", f"localhost:{b.port}",
                    "--device-id", "dev1", env=env_for(pki))
        assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t == "edgecam/dev1/result"]) >= 3, 60), d.log()
        assert rec.on("status")[0] == b"online"
        # Commands are on (the connection is authenticated) and answered on the device's own topic.
        publish(b.port, "edgecam/dev1/cmd", json.dumps({"cmd": "ping", "id": "tls"}), ca=pki / "ca.crt",
                auth=("watcher", PASSWORDS["watcher"]), host="localhost")
        assert rec.wait_for(lambda m: any(t == "edgecam/dev1/cmd/reply" for t, _, _ in m), 15), d.log()
        assert json.loads(rec.on("reply")[0])["id"] == "tls"
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log()
        assert rec.wait_for(lambda m: rec.on("status")[-1:] == [b"offline"], 10)
        log = d.log()
        assert PASSWORDS["dev1"] not in log and "commands: on" in log
        rec.close()
    finally:
        b.stop()


def test_password_from_a_file_and_a_client_certificate(tmp_path: Path, pki: Path, daemons) -> None:
    b = tls_broker(tmp_path, pki, require_cert=True)
    secret = tmp_path / "password"
    secret.write_text(PASSWORDS["dev1"] + "\n")
    try:
        rec = watcher(b, pki, "edgecam/dev1/result")
        env = env_for(pki, EDGECAM_MQTT_CERT_FILE=str(pki / "client.crt"),
                      EDGECAM_MQTT_KEY_FILE=str(pki / "client.key"), EDGECAM_MQTT_PASSWORD_FILE=str(secret))
        del env["EDGECAM_MQTT_PASSWORD"]
        d = daemons("--source", IMAGES, "--once", "--max-frames", "3", "--broker", f"localhost:{b.port}",
                    "--device-id", "dev1", env=env)
        assert d.wait(60) == 0, d.log()
        assert rec.wait_for(lambda m: len(m) >= 3, 10)
        rec.close()

        # The same listener without the client certificate: refused in the handshake, said once per try.
        env = env_for(pki)
        d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", f"localhost:{b.port}",
                    "--device-id", "dev1", env=env)
        _refused_with_backoff(d, "closed the connection before accepting it")
    finally:
        b.stop()


def _refused_with_backoff(d, needle: str, seconds: float = 6) -> list[str]:  # type: ignore[no-untyped-def]
    # Count from the first refusal: start-up (model, source) takes its own time on a busy machine.
    assert wait_until(lambda: needle in d.log() or d.proc.poll() is not None, 90, 0.1), d.log()
    time.sleep(seconds)
    assert d.proc.poll() is None, d.log()  # retrying, not crashing
    lines = [line for line in d.log().splitlines() if needle in line]
    assert 1 <= len(lines) <= 6, d.log()  # one line per backoff step (1 s, 2 s, 2 s, ...), not a flood
    assert all("retrying in" in line for line in lines)
    assert "Traceback" not in d.log()
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    return lines


@pytest.mark.parametrize(("host", "env", "needle", "said"), [
    ("localhost", {"password": "not-the-password-4711"}, "refused the connection",
     ("not authorized", "not authorised")),
    ("localhost", {"EDGECAM_MQTT_CA_FILE": "other-ca.crt"}, "TLS with localhost", ("certificate verify failed",)),
    # The server's certificate names localhost, not 127.0.0.1.
    ("127.0.0.1", {}, "TLS with 127.0.0.1", ("Hostname mismatch", "IP address mismatch")),
], ids=["wrong-password", "unknown-ca", "wrong-host-name"])
def test_a_refused_connection_is_said_and_retried(tmp_path: Path, pki: Path, daemons, host: str,
                                                   env: dict[str, str], needle: str, said: tuple[str, ...]) -> None:
    env = {k: str(pki / v) if k.endswith("_FILE") else v for k, v in env.items()}
    b = tls_broker(tmp_path, pki)
    try:
        d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", f"{host}:{b.port}", "--device-id", "dev1",
                    env=env_for(pki, **env))
        lines = _refused_with_backoff(d, needle)
        assert any(s.lower() in lines[0].lower() for s in said), lines[0]
        assert "4711" not in d.log()  # the password is never logged
    finally:
        b.stop()


def test_a_device_cannot_publish_under_another_devices_prefix(tmp_path: Path, pki: Path, daemons) -> None:
    b = tls_broker(tmp_path, pki)
    try:
        rec = watcher(b, pki, "edgecam/dev2/#")
        # dev1's credentials, dev2's topics: the broker refuses the Last Will topic or every message.
        d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", f"localhost:{b.port}", "--device-id", "dev2",
                    env=env_for(pki, "dev1", EDGECAM_MQTT_PROTOCOL="5"))
        refused = ("refused the connection: Not authorized", "refused a message: Not authorized")
        assert wait_until(lambda: any(r in d.log() for r in refused) or d.proc.poll() is not None, 90, 0.1), d.log()
        time.sleep(3)
        assert d.proc.poll() is None, d.log()
        assert rec.messages == []
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(30) == 0
        # A plain client with dev1's password cannot write there either (3.1.1: dropped without a word).
        publish(b.port, "edgecam/dev2/result", b"{}", ca=pki / "ca.crt", auth=("dev1", PASSWORDS["dev1"]),
                host="localhost")
        time.sleep(1)
        assert rec.messages == []
        rec.close()
    finally:
        b.stop()


def test_bad_tls_files_are_one_line(pki: Path, tmp_path: Path) -> None:
    port = str(free_port())
    proc = run_cli("run", "--source", IMAGES, "--broker", f"localhost:{port}",
                   env=env_for(pki, EDGECAM_MQTT_CA_FILE=str(pki / "not-a-cert.pem")))
    assert proc.returncode == 2
    one_error_line(proc, "mqtt.ca_file", "not-a-cert.pem")
    proc = run_cli("run", "--source", IMAGES, "--broker", f"localhost:{port}",
                   env=env_for(pki, EDGECAM_MQTT_CERT_FILE=str(pki / "client.crt"),
                               EDGECAM_MQTT_KEY_FILE=str(pki / "not-a-cert.pem")))
    assert proc.returncode == 2
    one_error_line(proc, "mqtt.cert_file", "client.crt")
    proc = run_cli("run", "--source", IMAGES, env=env_for(pki, EDGECAM_MQTT_CA_FILE=str(tmp_path / "missing.crt")))
    assert proc.returncode == 2
    one_error_line(proc, "mqtt.ca_file", "no such file")


def test_config_check_never_shows_the_password(pki: Path) -> None:
    proc = run_cli("config", "check", env=env_for(pki))
    assert proc.returncode == 0, proc.stderr
    assert PASSWORDS["dev1"] not in proc.stdout + proc.stderr and "<redacted>" in proc.stdout


def _watch(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    import os
    import sys

    from conftest import ROOT

    return subprocess.Popen([sys.executable, "-m", "edgecam", "watch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def test_watch_shows_results_from_the_secured_broker(tmp_path: Path, pki: Path, daemons) -> None:
    b = tls_broker(tmp_path, pki, require_cert=True)
    secret = tmp_path / "watcher-password"
    secret.write_text(PASSWORDS["watcher"] + "\n")
    try:
        watch = _watch("--broker", f"localhost:{b.port}", "--tls", "--ca-file", pki / "ca.crt",
                       "--cert-file", pki / "client.crt", "--key-file", pki / "client.key",
                       "--username", "watcher", "--password-file", secret, "--device", "dev1",
                       "-n", "3", "--timeout", "120")
        # Subscribed (said on stderr once the broker confirmed) before the device publishes anything.
        assert "watching edgecam/dev1/" in watch.stderr.readline()
        d = daemons("--source", IMAGES, "--once", "--max-frames", "3", "--broker", f"localhost:{b.port}",
                    "--device-id", "dev1", env=env_for(pki, EDGECAM_MQTT_CERT_FILE=str(pki / "client.crt"),
                                                       EDGECAM_MQTT_KEY_FILE=str(pki / "client.key")))
        out, err = watch.communicate(timeout=120)
        assert watch.returncode == 0, err + d.log()
        assert [line.split()[:2] for line in out.splitlines() if line.startswith("dev1 #")] == [
            ["dev1", "#1"], ["dev1", "#2"], ["dev1", "#3"]]
        assert "dev1 is online" in out
        assert PASSWORDS["watcher"] not in out + err
        assert d.wait(60) == 0, d.log()
    finally:
        b.stop()


def test_watch_says_why_a_secured_broker_refuses_it(tmp_path: Path, pki: Path) -> None:
    b = tls_broker(tmp_path, pki)
    try:
        # The password from the environment, and a wrong one: the broker's refusal, one line, exit 2.
        watch = _watch("--broker", f"localhost:{b.port}", "--tls", "--ca-file", pki / "ca.crt",
                       "--username", "watcher", "--timeout", "60", env={"EDGECAM_MQTT_PASSWORD": "wrong-4711"})
        _, err = watch.communicate(timeout=90)
        assert watch.returncode == 2, err
        assert err.strip().splitlines() == [err.strip()] and "refused the connection: Not authorized" in err, err
        assert "4711" not in err and "Traceback" not in err
        # A CA that did not sign the broker's certificate: the TLS failure, one line, exit 2.
        watch = _watch("--broker", f"localhost:{b.port}", "--tls", "--ca-file", pki / "other-ca.crt",
                       "--username", "watcher", "--timeout", "60",
                       env={"EDGECAM_MQTT_PASSWORD": PASSWORDS["watcher"]})
        _, err = watch.communicate(timeout=90)
        assert watch.returncode == 2, err
        assert err.strip().startswith("edgecam: error: TLS with localhost") and "certificate verify failed" in err
        assert len(err.strip().splitlines()) == 1, err
    finally:
        b.stop()


@pytest.mark.parametrize(
    ("args", "needles"),
    [(["--ca-file", "ca.crt"], ["--ca-file", "--tls"]),
     (["--tls", "--cert-file", "client.crt"], ["--cert-file", "--key-file"]),
     (["--tls", "--ca-file", "not-a-cert.pem"], ["--ca-file", "not-a-cert.pem", "not a usable CA"]),
     (["--username", "w", "--password-file", "missing"], ["--password-file", "missing", "cannot read"]),
     (["--password-file", "passwd"], ["--password-file", "--username"]),
     (["--username", "w", "--password-file", "/dev/zero"], ["--password-file", "/dev/zero", "over 4096 bytes"])],
)
def test_watch_login_and_tls_flags_are_checked_in_one_line(pki: Path, args: list[str], needles: list[str]) -> None:
    args = [str(pki / a) if (pki / a).exists() or a == "missing" else a for a in args]
    proc = run_cli("watch", "--broker", f"localhost:{free_port()}", *args, "--timeout", "5", timeout=60)
    assert proc.returncode == 2
    one_error_line(proc, *needles)


def test_a_frozen_tls_broker_is_reported_as_silent(tmp_path: Path, pki: Path, daemons) -> None:
    b = tls_broker(tmp_path, pki)
    try:
        rec = watcher(b, pki, "edgecam/dev1/result")
        d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", f"localhost:{b.port}", "--device-id", "dev1",
                    env=env_for(pki, EDGECAM_MQTT_KEEPALIVE="5"))
        assert rec.wait_for(lambda m: len(m) >= 2, 90), d.log()
        assert b.proc is not None
        b.proc.send_signal(signal.SIGSTOP)  # its sockets stay open; the kernel still accepts connections
        try:
            lost = f"lost the connection to localhost:{b.port} (no answer within the keepalive, 5 s)"
            assert wait_until(lambda: lost in d.log(), 60, 0.1), d.log()
            # Reconnecting: the TCP connection opens, and nothing answers the TLS handshake or the CONNECT.
            silent = f"no answer from localhost:{b.port} "
            assert wait_until(lambda: d.log().count(silent) >= 2, 60, 0.1), d.log()
            log = d.log()
            assert "client certificate" not in log and "cannot reach" not in log, log
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: "s away" in d.log(), 60, 0.1), d.log()
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.log()
        rec.close()
    finally:
        b.stop()
