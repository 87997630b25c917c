"""Scale-out for real: breeze-stream replicas (separate processes, tiny model) behind a real NGINX.

NGINX runs deploy/nginx.conf itself, with only the environment swapped in (loopback replicas for
its `server breeze:8765` line, a loopback listen port, temp paths under a tmp prefix). Checks:
sessions spread over the replicas (least_conn); a replica sent SIGTERM mid-stream flushes its
open segment (final, `end`, close 1001) while new sessions go to the others; a replica killed
with SIGKILL costs only its own sessions; a replica at --max-sessions answers 503 and NGINX
retries the next one; a balancer without the upgrade headers fails fast with a clear HTTP error;
a replica that cannot load its model never reports ready. Plus static checks of deploy/
(nginx -t, the Kubernetes manifests and compose file parsed, their serve flags through the real
argument parser).

Which replica holds a session is read from the replicas' own `breeze_sessions_active` gauges:
sessions are opened one at a time and the gauge that went up names the replica. Everything is
on loopback, every process runs in its own process group and is killed with it at the end.
Needs Debian's `nginx` (.ci/run installs it); skipped without it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.nginx import (
    DEPLOY,
    NGINX,
    ROOT,
    ProcessGroups,
    free_port,
    http_get,
    nginx_command,
    render_nginx_conf,
    start_nginx,
)
from bench.tiny import TINY_TEXT, save_tiny_model

needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx; .ci/run does)"
)

RATE = 16000
FRAME = 3200  # bytes of pcm_s16le: 0.1 s


# --- audio ---------------------------------------------------------------------------------------


def voiced(seconds: float, f0: float = 140.0) -> bytes:
    """A harmonic buzz that webrtcvad takes for steady speech, as pcm_s16le."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / RATE
    x = sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 30))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * x / np.abs(x).max() * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


# --- processes -----------------------------------------------------------------------------------


def metric(port: int, name: str, labels: str = "") -> float | None:
    """One sample of a replica's /metrics, e.g. metric(p, "breeze_connections_rejected_total", 'reason="draining"')."""
    status, body, _ = http_get(port, "/metrics")
    if status != 200:
        return None
    key = f"{name}{{{labels}}}" if labels else name
    for line in body.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None


@dataclasses.dataclass
class Replica:
    port: int
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def sessions(self) -> float:
        value = metric(self.port, "breeze_sessions_active")
        assert value is not None, f"replica :{self.port} has no metrics (exit {self.proc.poll()}):\n{self.log_tail()}"
        return value

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)


class Cluster:
    """Replicas and NGINX for one test; every process group is killed at teardown."""

    def __init__(self, model: Path, tmp: Path) -> None:
        self.model = model
        self.tmp = tmp
        self.groups = ProcessGroups()
        self.replicas: list[Replica] = []
        self.nginx_port: int | None = None

    def start_replicas(self, n: int, *flags: str, model: Path | None = None, wait: bool = True) -> list[Replica]:
        started = []
        for _ in range(n):
            port = free_port()
            log = self.tmp / f"replica-{port}.log"
            args = [
                sys.executable,
                "-m",
                "breeze_stream",
                "serve",
                "--model",
                str(model or self.model),
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *flags,
            ]
            started.append(Replica(port, self.groups.spawn(args, log), log))
        if wait:
            for replica in started:
                self.wait_ready(replica)
        self.replicas += started
        return started

    @staticmethod
    def wait_ready(replica: Replica, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if replica.proc.poll() is not None:
                pytest.fail(f"replica :{replica.port} exited with {replica.proc.returncode}:\n{replica.log_tail()}")
            if http_get(replica.port, "/readyz", timeout=1)[0] == 200:
                return
            time.sleep(0.05)
        pytest.fail(f"replica :{replica.port} not ready within {timeout:g} s:\n{replica.log_tail()}")

    def start_nginx(self, upstream: list[Replica], edit: Callable[[str], str] = lambda text: text) -> int:
        prefix = self.tmp / f"nginx-{len(self.groups.procs)}"
        self.nginx_port = start_nginx(self.groups, prefix, [r.port for r in upstream], edit)
        return self.nginx_port

    def url(self, port: int | None = None) -> str:
        return f"ws://127.0.0.1:{port or self.nginx_port}/v1/stream"

    def close(self) -> None:
        self.groups.close()


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def cluster(tiny_model_file, tmp_path):
    c = Cluster(tiny_model_file, tmp_path)
    try:
        yield c
    finally:
        c.close()


# --- clients -------------------------------------------------------------------------------------


class Client:
    """One native-protocol session: opened with start, events collected in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.replica: Replica | None = None
        self._changed = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, url: str) -> Client:
        ws = await connect(url, open_timeout=10, close_timeout=3, ping_interval=None)
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le"}))
        client = cls(ws)
        await client.wait_for(lambda e: e["type"] == "ready")
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.events.append(json.loads(message))
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self._changed.set()

    @property
    def closed(self) -> bool:
        return self.reader.done()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            if self.closed:
                raise AssertionError(f"closed ({self.ws.close_code}) without the event; got {self.types()}")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no such event within {timeout:g} s; got {self.types()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def send_audio(self, pcm: bytes, pace: float = 0.002) -> None:
        for i in range(0, len(pcm), FRAME):
            await self.ws.send(pcm[i : i + FRAME])
            await asyncio.sleep(pace)

    async def finish(self, timeout: float = 15.0) -> None:
        """stop, then every event up to the close."""
        await self.ws.send(json.dumps({"type": "stop"}))
        await self.wait_closed(timeout)

    async def wait_closed(self, timeout: float = 15.0) -> None:
        await asyncio.wait_for(asyncio.shield(self.reader), timeout)

    def finals(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "final"]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


async def open_located(url: str, replicas: list[Replica]) -> Client:
    """Opens a session and finds the replica that took it (the one whose active-sessions gauge went up)."""

    def gauges() -> list[float | None]:  # None: the replica is gone
        return [r.sessions() if r.proc.poll() is None else None for r in replicas]

    before = await asyncio.to_thread(gauges)
    client = await Client.open(url)
    after = await asyncio.to_thread(gauges)
    grown = [r for r, b, a in zip(replicas, before, after) if a is not None and b is not None and a == b + 1]
    assert len(grown) == 1, f"cannot tell which replica took the session: {before} -> {after}"
    client.replica = grown[0]
    return client


def assert_completed(client: Client, code: int = 1000, reason: str | None = None) -> None:
    """A session that ended well: ready first, at least one final (the tiny model's text), `end` last, the close code."""
    types = client.types()
    assert types[0] == "ready" and types[-1] == "end", types
    assert client.finals() and all(f["text"] == TINY_TEXT for f in client.finals()), client.events
    if reason is not None:
        assert client.events[-1].get("reason") == reason, client.events[-1]
    assert client.ws.close_code == code, (client.ws.close_code, types)


async def within(seconds: float, coroutine):
    """The whole scenario is bounded: a hang fails the test instead of stalling the suite."""
    return await asyncio.wait_for(coroutine, seconds)


# --- the balancer, live --------------------------------------------------------------------------


@needs_nginx
async def test_sessions_spread_least_conn(cluster: Cluster):
    replicas = cluster.start_replicas(3)
    cluster.start_nginx(replicas)

    async def scenario():
        clients = [await open_located(cluster.url(), replicas) for _ in range(6)]
        counts = {r.port: sum(c.replica is r for c in clients) for r in replicas}
        assert sorted(counts.values()) == [2, 2, 2], counts  # least_conn: each new session to an emptiest replica
        await asyncio.gather(*(c.send_audio(silence(0.2) + voiced(1.2) + silence(0.8)) for c in clients))
        # the sessions of one replica end: the next two sessions go there (round-robin would not)
        emptied = clients[0].replica
        done = [c for c in clients if c.replica is emptied]
        await asyncio.gather(*(c.finish() for c in done))
        await asyncio.sleep(0.3)  # NGINX has seen the upstream connections close
        refill = [await open_located(cluster.url(), replicas) for _ in range(2)]
        assert all(c.replica is emptied for c in refill), [c.replica.port for c in refill]
        rest = [c for c in clients if c not in done] + refill
        await asyncio.gather(*(c.send_audio(voiced(0.6) + silence(0.8)) for c in refill))
        await asyncio.gather(*(c.finish() for c in rest))
        for client in clients + refill:
            assert_completed(client)
        # the balancer does not pretend to be one replica
        status, body, _ = await asyncio.to_thread(http_get, cluster.nginx_port, "/metrics")
        assert status == 404 and "each replica" in body

    await within(40, scenario())


DRAIN_TIMEOUT = 5.0


@needs_nginx
async def test_sigterm_drains_mid_stream_while_new_sessions_go_elsewhere(cluster: Cluster):
    replicas = cluster.start_replicas(3, "--drain-timeout", str(DRAIN_TIMEOUT))
    cluster.start_nginx(replicas)

    async def scenario():
        clients = [await open_located(cluster.url(), replicas) for _ in range(3)]
        assert {c.replica.port for c in clients} == {r.port for r in replicas}
        draining = clients[0].replica
        # every session mid-speech: a segment is open (a partial of it arrived) when the signal comes
        await asyncio.gather(*(c.send_audio(silence(0.2) + voiced(1.5)) for c in clients))
        await asyncio.gather(*(c.wait_for(lambda e: e["type"] == "partial") for c in clients))
        # a client that stopped reading, straight to the draining replica: its close handshake
        # never completes, so the drain lasts (bounded by --drain-timeout) and we can watch it
        stuck = await Client.open(cluster.url(draining.port))
        stuck.ws.transport.pause_reading()
        signalled = time.monotonic()
        draining.signal(signal.SIGTERM)

        await clients[0].wait_closed(10)
        assert_completed(clients[0], code=1001, reason="shutdown")  # the open segment's final, then end
        status, body, _ = await asyncio.to_thread(http_get, draining.port, "/readyz")
        assert draining.proc.poll() is None and status == 503 and json.loads(body)["status"] == "draining", (
            status,
            body,
        )

        # new sessions while it drains: NGINX tries it (fewest connections), gets 503, retries elsewhere
        others = [r for r in replicas if r is not draining]
        newcomers = [await open_located(cluster.url(), replicas) for _ in range(3)]
        assert all(c.replica in others for c in newcomers), [c.replica.port for c in newcomers]
        assert draining.proc.poll() is None, "the drain ended before the new sessions came: nothing was diverted"
        rejected = await asyncio.to_thread(
            metric, draining.port, "breeze_connections_rejected_total", 'reason="draining"'
        )
        assert rejected is not None and rejected >= 1, "NGINX never tried the draining replica"

        # everyone else is untouched: the sessions that were open and the new ones complete normally
        rest = clients[1:] + newcomers
        await asyncio.gather(*(c.send_audio(voiced(0.6) + silence(0.8)) for c in rest))
        await asyncio.gather(*(c.finish() for c in rest))
        for client in rest:
            assert_completed(client)
        # once the stuck client is gone, the drained replica exits on its own, cleanly, within
        # --drain-timeout (with the client still stuck: the next test)
        stuck.ws.transport.abort()
        rc = await asyncio.to_thread(draining.proc.wait, DRAIN_TIMEOUT + 2)
        assert rc == 0, draining.log_tail()
        assert time.monotonic() - signalled < DRAIN_TIMEOUT + 1.0, "exited later than --drain-timeout"

    await within(45, scenario())


async def test_drain_exits_within_drain_timeout_with_unresponsive_client(cluster: Cluster):
    """Kubernetes kills a pod at terminationGracePeriodSeconds: the drain must end within --drain-timeout
    even when a client never answers the close frame."""
    (replica,) = cluster.start_replicas(1, "--drain-timeout", "3")

    async def scenario():
        stuck = await Client.open(cluster.url(replica.port))
        await stuck.send_audio(voiced(1.0))
        stuck.ws.transport.pause_reading()
        signalled = time.monotonic()
        replica.signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(replica.proc.wait, 3 + 1.0)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {time.monotonic() - signalled:.1f} s after SIGTERM with "
                f"--drain-timeout 3:\n{replica.log_tail()}"
            ) from None
        finally:
            stuck.ws.transport.abort()
        assert rc == 0, replica.log_tail()

    await within(30, scenario())


@needs_nginx
async def test_sigkill_costs_only_its_own_sessions(cluster: Cluster):
    replicas = cluster.start_replicas(3)
    cluster.start_nginx(replicas)

    async def scenario():
        clients = [await open_located(cluster.url(), replicas) for _ in range(6)]
        await asyncio.gather(*(c.send_audio(silence(0.2) + voiced(1.0)) for c in clients))
        victim = clients[0].replica
        victim.signal(signal.SIGKILL)
        await asyncio.to_thread(victim.proc.wait, 5)
        lost = [c for c in clients if c.replica is victim]
        kept = [c for c in clients if c.replica is not victim]
        assert len(lost) == 2 and len(kept) == 4
        for client in lost:  # their clients see the close promptly, no `end`: nobody flushed them
            await client.wait_closed(5)
            assert "end" not in client.types() and client.ws.close_code != 1000
        assert not any(c.closed for c in kept)
        # new sessions avoid the dead replica (NGINX: connection refused -> next one, then max_fails)
        newcomers = [await open_located(cluster.url(), replicas) for _ in range(3)]
        assert all(c.replica is not victim for c in newcomers)
        rest = kept + newcomers
        await asyncio.gather(*(c.send_audio(voiced(0.6) + silence(0.8)) for c in rest))
        await asyncio.gather(*(c.finish() for c in rest))
        for client in rest:
            assert_completed(client)

    await within(40, scenario())


@needs_nginx
async def test_full_replica_diverts_new_sessions(cluster: Cluster):
    replicas = cluster.start_replicas(3, "--max-sessions", "2")
    cluster.start_nginx(replicas)
    full = replicas[0]

    async def scenario():
        # fill one replica behind NGINX's back (as another balancer's clients would): NGINX counts
        # no connections to it, so least_conn keeps choosing it; it answers 503 and NGINX retries
        direct = [await Client.open(cluster.url(full.port)) for _ in range(2)]
        status, body, _ = await asyncio.to_thread(http_get, full.port, "/readyz")
        assert status == 503 and json.loads(body)["status"] == "full", (status, body)
        clients = [await open_located(cluster.url(), replicas) for _ in range(4)]
        assert all(c.replica is not full for c in clients), [c.replica.port for c in clients]
        assert (
            await asyncio.to_thread(metric, full.port, "breeze_connections_rejected_total", 'reason="overloaded"') >= 1
        )

        # every replica full: the client gets a clear 503 with Retry-After, not a hang
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(cluster.url())
        response = refused.value.response
        assert response.status_code == 503 and response.headers.get("Retry-After"), response
        assert b"retry" in response.body.lower(), response.body

        # room again: readiness returns, and once NGINX's fail_timeout has passed (3 s, counted in
        # whole seconds: up to 4 s) sessions reach it again; until then NGINX still answers 503
        await direct[0].close()
        for _ in range(100):
            if (await asyncio.to_thread(http_get, full.port, "/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("readiness did not come back after a session ended")
        deadline = time.monotonic() + 6
        while True:
            try:
                back = await open_located(cluster.url(), replicas)
                break
            except InvalidStatus as exc:
                assert exc.response.status_code == 503 and time.monotonic() < deadline, exc
                await asyncio.sleep(0.5)
        assert back.replica is full
        for client in [*clients, back, direct[1]]:
            await client.send_audio(voiced(0.6) + silence(0.8), pace=0)
        await asyncio.gather(*(c.finish() for c in [*clients, back, direct[1]]))
        for client in [*clients, back, direct[1]]:
            assert_completed(client)

    await within(40, scenario())


@needs_nginx
async def test_misconfigured_balancer_and_unloadable_model_fail_clearly(cluster: Cluster, tmp_path: Path):
    """A proxy without the upgrade headers answers at once with the server's HTTP 426 (what the
    troubleshooting section of docs/scaleout.md names); a replica whose model cannot load never
    reports ready and exits, and the balancer serves from the others."""
    broken_model = tmp_path / "broken.pt"
    broken_model.write_bytes(b"not a checkpoint")
    good = cluster.start_replicas(1)
    bad = cluster.start_replicas(1, model=broken_model, wait=False)[0]

    def no_upgrade(text: str) -> str:
        lines = [
            line
            for line in text.splitlines()
            if "proxy_set_header Upgrade" not in line and "proxy_set_header Connection" not in line
        ]
        assert len(lines) == len(text.splitlines()) - 2
        return "\n".join(lines)

    async def scenario():
        readiness = set()
        while bad.proc.poll() is None:
            readiness.add((await asyncio.to_thread(http_get, bad.port, "/readyz", 1))[0])
            await asyncio.sleep(0.02)
        assert bad.proc.returncode != 0 and 200 not in readiness, (bad.proc.returncode, readiness, bad.log_tail())

        cluster.start_nginx([bad, *good])
        clients = [await open_located(cluster.url(), good) for _ in range(2)]
        await asyncio.gather(*(c.send_audio(voiced(0.6) + silence(0.8), pace=0) for c in clients))
        await asyncio.gather(*(c.finish() for c in clients))
        for client in clients:
            assert_completed(client)

        broken = cluster.start_nginx(good, edit=no_upgrade)
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(cluster.url(broken))
        assert time.monotonic() - started < 5
        response = refused.value.response
        assert response.status_code == 426 and b"connection header" in response.body.lower(), (response, response.body)

    await within(40, scenario())


# --- deploy/, statically -------------------------------------------------------------------------


@needs_nginx
def test_nginx_conf_is_valid(tmp_path: Path):
    """`nginx -t` on deploy/nginx.conf (rendered for loopback as the live tests run it), and the
    directives the live tests rely on. The unrendered file needs NGINX >= 1.27.3 for `resolve`."""
    text = (DEPLOY / "nginx.conf").read_text()
    for directive in (
        "least_conn;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_http_version 1.1;",
        "proxy_next_upstream error timeout http_503;",
        "zone breeze",
    ):
        assert directive in text, directive
    assert int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1)) >= 3600
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(text, [free_port(), free_port()], free_port(), tmp_path / "temp"))
    check = subprocess.run(nginx_command(conf, tmp_path, test=True), capture_output=True, text=True, timeout=20)
    assert check.returncode == 0, check.stderr
    version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) >= (1, 27, 3):
        raw = tmp_path / "raw.conf"
        raw.write_text(
            text.replace(
                "http {",
                "http {"
                + "".join(
                    f"\n    {k}_temp_path {tmp_path / 'temp' / k};"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
                ),
                1,
            )
        )
        check = subprocess.run(nginx_command(raw, tmp_path, test=True), capture_output=True, text=True, timeout=20)
        assert check.returncode == 0, check.stderr


def serve_parser() -> argparse.ArgumentParser:
    from streaming.options import add_model_arguments, add_serve_arguments

    parser = argparse.ArgumentParser(prog="breeze-stream serve")
    add_model_arguments(parser)
    add_serve_arguments(parser)
    return parser


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def k8s_objects() -> dict[str, list[dict]]:
    yaml = pytest.importorskip("yaml")
    objects: dict[str, list[dict]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if "apiVersion" not in doc or doc.get("kind") == "Kustomization":  # Helm values, kustomize's list
                continue
            assert doc.get("kind") and doc.get("metadata", {}).get("name"), f"{path.name}: {doc}"
            objects.setdefault(doc["kind"], []).append(doc)
    return objects


def test_kubernetes_manifests():
    objects = k8s_objects()
    for kind in ("Deployment", "Service", "Ingress", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert len(objects.get(kind, [])) == 1, f"one {kind} expected, found {len(objects.get(kind, []))}"
    deployment, service, ingress = objects["Deployment"][0], objects["Service"][0], objects["Ingress"][0]
    pdb, hpa = objects["PodDisruptionBudget"][0], objects["HorizontalPodAutoscaler"][0]
    assert deployment["apiVersion"] == "apps/v1" and ingress["apiVersion"] == "networking.k8s.io/v1"
    assert pdb["apiVersion"] == "policy/v1" and hpa["apiVersion"] == "autoscaling/v2"

    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selected = deployment["spec"]["selector"]["matchLabels"]
    assert selected.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # probes: readiness on /readyz (turns 503 draining or full), liveness on /healthz, a startup
    # probe for the model load, all on the server's port
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert all(p["port"] in (ports["http"], "http") for p in probes.values())

    # the serve flags the pod passes are real flags, and the drain fits the grace period
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    args = container.get("args", [])
    port = int(env.get("BREEZE_PORT", 8765))
    assert port == ports["http"]
    parsed = serve_parser().parse_args(["--port", str(port), *args])
    assert parsed.max_sessions > 0 and parsed.max_connections_per_client == 0, (
        "behind a proxy: limit per client at the ingress"
    )
    pre_stop = container["lifecycle"]["preStop"]
    sleep = int(pre_stop["sleep"]["seconds"]) if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert "kill" not in json.dumps(pre_stop), "a second signal cuts the drain short: preStop must not signal"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= sleep + float(flag_value(args, "--drain-timeout")) + 5, (grace, sleep)

    # one GPU per pod, CPU and memory requested
    resources = container["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "gpu" in container["image"]

    # Service -> pods, Ingress -> Service, with the WebSocket annotations
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ("http", ports["http"])
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"].get("number") == service_port["port"] or backend["port"].get("name") == service_port.get(
        "name"
    )
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert "http_503" in annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert annotations["nginx.org/websocket-services"] == service["metadata"]["name"]

    # HPA on the active sessions per pod (Prometheus adapter), scaling the Deployment
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (hpa_metric,) = hpa["spec"]["metrics"]
    assert hpa_metric["type"] == "Pods" and hpa_metric["pods"]["metric"]["name"] == "breeze_sessions_active"
    target = float(hpa_metric["pods"]["target"]["averageValue"])
    assert 0 < target < parsed.max_sessions, "scale out before the replicas are full"
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]

    # every volume claim the pods mount is declared; kustomization.yaml lists files that exist
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v
    }
    assert claims <= {c["metadata"]["name"] for c in objects.get("PersistentVolumeClaim", [])}, claims
    yaml = pytest.importorskip("yaml")
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / name).is_file() for name in kustomization["resources"])

    # the adapter exposes exactly that metric name
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert any(
        "breeze_sessions_active" in rule["seriesQuery"]
        and rule["name"].get("as", "breeze_sessions_active") == "breeze_sessions_active"
        for rule in rules
    )


def test_compose_file():
    """deploy/compose.yaml with its variables at their defaults (as `docker compose config` would)."""
    yaml = pytest.importorskip("yaml")
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", (DEPLOY / "compose.yaml").read_text())
    assert "${" not in text, "every variable needs a default"
    compose = yaml.safe_load(text)
    services = compose["services"]
    nginx, breeze = services["nginx"], services["breeze"]
    assert any(str(v).startswith("./nginx.conf:/etc/nginx/nginx.conf") for v in nginx["volumes"])
    assert (ROOT / "docker" / Path(breeze["build"]["dockerfile"]).name).is_file()
    assert "8765" in str(breeze.get("expose", [])) and "ports" not in breeze, "replicas are reached through NGINX only"
    command = [str(a) for a in breeze["command"]]
    parsed = serve_parser().parse_args(["--port", "8765", *command])  # the image's entrypoint adds --port 8765
    assert parsed.max_connections_per_client == 0 and parsed.max_sessions > 0
    grace = breeze["stop_grace_period"]
    assert int(grace.rstrip("s")) >= float(flag_value(command, "--drain-timeout")) + 5
    assert int(breeze["deploy"]["replicas"]) >= 2
    assert nginx["image"].startswith("nginx:") and tuple(
        map(int, nginx["image"].split(":")[1].split("-")[0].split("."))
    ) >= (1, 27), "`resolve` in upstream blocks needs open-source NGINX >= 1.27.3"
