"""Two network "nodes" on one machine, for the multi-node test (``make test-multinode``).

    python -m tests.e2e.netns -- CMD...     # as root; CMD runs inside node 0's namespace

Makes two network namespaces joined by a veth pair, with addresses only inside them
(``10.77.0.1/24`` and ``10.77.0.2/24``, no default route, so nothing leaves them), runs CMD
in node 0's namespace with ``STEERD_MN`` (JSON: each node's namespace, address and
interface) in its environment, and tears everything down afterwards, even on failure or a
signal: every process left in either namespace is killed, the namespaces (and the veth pair
with them) are deleted, and the scratch directory under /var/tmp is removed.

A node is a process started with ``node_argv``: in its namespace, with its own mount and
IPC namespaces and fresh tmpfs on ``/dev/shm`` and ``/tmp`` (plain ``ip netns exec`` shares
them, and vLLM would then take the other node for the same machine and use shared memory
between them; so would an ``ipc://`` socket). Files both nodes read (model, SAEs) live
under ``/var/tmp`` (``STEERD_MN["work"]``).

Not root, or no ``ip``/``unshare``: prints why and exits 0 (the test is skipped).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

NET = "10.77.0"
MN_ENV = "STEERD_MN"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def node_argv(node: dict, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run as ``node`` (an entry of ``STEERD_MN["nodes"]``): in its network
    namespace, with private mount and IPC namespaces and fresh ``/dev/shm`` and ``/tmp``.
    The command ``exec``s through, so the returned process is ``argv`` itself."""
    pairs = [f"{k}={v}" for k, v in (env or {}).items()]
    return ["ip", "netns", "exec", node["ns"], "unshare", "--mount", "--propagation", "private",
            "--ipc", "--", "env", *pairs, "bash", "-c",
            'mount -t tmpfs -o size=4g tmpfs /dev/shm && mount -t tmpfs tmpfs /tmp && exec "$@"',
            "node", *argv]


class Namespaces:
    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.nodes = [{"ns": f"steerdmn{tag}{c}", "ip": f"{NET}.{i + 1}", "iface": f"stmn{tag}{c}"}
                      for i, c in enumerate("ab")]
        self.work = tempfile.mkdtemp(prefix="steerd-mn-", dir="/var/tmp")
        self.up = False

    def setup(self) -> None:
        a, b = self.nodes
        self.up = True
        for n in self.nodes:
            _ip("netns", "add", n["ns"])
        _ip("link", "add", a["iface"], "type", "veth", "peer", "name", b["iface"])
        for n in self.nodes:
            _ip("link", "set", n["iface"], "netns", n["ns"])
            _ip("-n", n["ns"], "addr", "add", f"{n['ip']}/24", "dev", n["iface"])
            _ip("-n", n["ns"], "link", "set", n["iface"], "up")
            _ip("-n", n["ns"], "link", "set", "lo", "up")

    def teardown(self) -> None:
        if self.up:
            self.up = False
            for n in self.nodes:  # every process still in a namespace (stray engine workers)
                pids = _ip("netns", "pids", n["ns"], check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
            for n in self.nodes:
                _ip("netns", "del", n["ns"], check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {MN_ENV: json.dumps({"nodes": self.nodes, "work": self.work})}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("test-multinode: skipped: needs root (network namespaces, mount namespaces)")
        return 0
    missing = [t for t in ("ip", "unshare", "mount") if shutil.which(t) is None]
    if missing:
        print(f"test-multinode: skipped: {', '.join(missing)} not found")
        return 0
    ns = Namespaces()
    atexit.register(ns.teardown)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        ns.setup()
        env = {**os.environ, **ns.env()}
        cmd = [a.replace("{work}", ns.work) for a in argv]
        proc = subprocess.Popen(["ip", "netns", "exec", ns.nodes[0]["ns"], *cmd], env=env)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        ns.teardown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
