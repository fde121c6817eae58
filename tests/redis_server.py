"""A real redis-server on a free loopback port, for the tests of what replicas share (quotas, jobs)."""

import shutil
import socket
import subprocess
from pathlib import Path

from conftest import free_port, wait_for

REDIS_SERVER = shutil.which("redis-server") or "redis-server"  # scripts/test.sh installs it when missing


class RedisServer:
    """A real redis-server on a free port of 127.0.0.1, with its data (append-only file) in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        """Start it (again, with the same data) and wait until it answers."""
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert wait_for(self._answers, timeout=20), "redis-server did not start"
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (SIGTERM: it flushes its data) and wait."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None
