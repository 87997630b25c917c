"""Breeze replicas behind a real NGINX on loopback, for tests/test_scaleout.py and bench/scaleout.py:
deploy/nginx.conf rendered for loopback upstreams, NGINX started and checked, every child process
in a process group of its own so that closing kills each group whole."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
SERVER_LINE = re.compile(r"^(\s*)server breeze:8765 resolve (.*);$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int | None, str, dict]:
    """(status, body, headers) of a loopback GET; status None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, "", {}


def render_nginx_conf(text: str, ports: list[int], listen: int, temp: Path) -> str:
    """deploy/nginx.conf for loopback replicas: its one upstream `server` line becomes one line per
    port (same parameters, without `resolve`, which open-source NGINX has only from 1.27.3 and a
    loopback address does not need), `listen 8080` a loopback port, and temp paths go under `temp`."""
    match = SERVER_LINE.search(text)
    assert match and len(SERVER_LINE.findall(text)) == 1, (
        "deploy/nginx.conf: expected one `server breeze:8765 resolve ...;`"
    )
    indent, params = match.groups()
    servers = "\n".join(f"{indent}server 127.0.0.1:{port} {params};" for port in ports)
    text = text[: match.start()] + servers + text[match.end() :]
    assert text.count("listen 8080;") == 1, "deploy/nginx.conf: expected one `listen 8080;`"
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    temps = "".join(
        f"\n    {kind}_temp_path {temp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {", "http {" + temps, 1)


def nginx_command(conf: Path, prefix: Path, test: bool = False) -> list[str]:
    assert NGINX is not None, "nginx is not installed (Debian: apt-get install nginx)"
    main = f"daemon off; pid {prefix / 'nginx.pid'};"
    if os.geteuid() == 0:
        main += " user root;"  # workers must reach the tmp prefix; nothing here binds a privileged port
    test_flags = ["-t", "-q"] if test else []
    return [NGINX, *test_flags, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log"), "-g", main]


class ProcessGroups:
    """Child processes, each the leader of its own process group; `close` kills every group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def start_nginx(
    groups: ProcessGroups, prefix: Path, ports: list[int], edit: Callable[[str], str] = lambda text: text
) -> int:
    """NGINX on deploy/nginx.conf (rendered for `ports`, then `edit`ed) under `prefix`, checked with
    `nginx -t`, started and answering /nginx-healthz; its port. Raises RuntimeError with its output."""
    (prefix / "temp").mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(edit(render_nginx_conf((DEPLOY / "nginx.conf").read_text(), ports, port, prefix / "temp")))
    check = subprocess.run(nginx_command(conf, prefix, test=True), capture_output=True, text=True, timeout=20)
    if check.returncode:
        raise RuntimeError(f"nginx -t:\n{check.stderr}")
    proc = groups.spawn(nginx_command(conf, prefix), prefix / "nginx.out")
    deadline = time.monotonic() + 10
    while http_get(port, "/nginx-healthz", timeout=1)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            logs = [prefix / "nginx.out", prefix / "error.log"]
            raise RuntimeError(
                "nginx did not start:\n" + "".join(p.read_text(errors="replace") for p in logs if p.exists())
            )
        time.sleep(0.05)
    return port
