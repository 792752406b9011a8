"""``predict --scheduler ADDRESS`` where ADDRESS is not a dask scheduler (issue 16 item 8): a peer that accepts
and stays silent, one that greets in another protocol, a closed port. Each ends with exit status 2 and one
error line naming the address, within the connect timeout (no hang, no traceback)."""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("distributed")

from napari_cytoclip import cli  # noqa: E402
from napari_cytoclip.inference import distributed as dist  # noqa: E402

TIMEOUT_S = 1.0
HANG_S = 60.0  # far beyond TIMEOUT_S: only a run that would hang for ever gets here


class Peer:
    """A local TCP server: ``silent`` accepts and never writes; ``http`` sends an HTTP reply and closes."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            if self.mode == "http":
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
                finally:
                    conn.close()
            else:
                self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _closed_port() -> tuple[str, None]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"tcp://127.0.0.1:{port}", None


def _peer(mode: str):
    def make():
        peer = Peer(mode)
        return peer.address, peer
    return make


CASES = {"accepts-and-waits": _peer("silent"), "http-greeting": _peer("http"), "closed-port": _closed_port}


@pytest.mark.parametrize("case", CASES)
def test_not_a_scheduler_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capfd):
    from PIL import Image

    monkeypatch.setattr(dist, "SCHEDULER_TIMEOUT_S", TIMEOUT_S)
    image = tmp_path / "section.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(image)
    address, peer = CASES[case]()
    result: dict = {}

    def run() -> None:
        result["rc"] = cli.main(["predict", str(image), "--pixel-size", "5", "--out", str(tmp_path / "out"),
                                 "--device", "cpu", "--scheduler", address])

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        thread.join(HANG_S)
        assert not thread.is_alive(), f"--scheduler {address} ({case}) still waiting after {HANG_S:g} s"
    finally:
        if peer is not None:
            peer.close()
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.get("rc") == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("napari-cytoclip: error:") and address in lines[0], lines[0]
    assert "did not answer as a dask scheduler" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_check_scheduler_accepts_a_real_scheduler():
    """The probe is not a blanket refusal: a real scheduler answers it."""
    from distributed import Scheduler
    import asyncio

    async def serve() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as scheduler:
            await asyncio.get_running_loop().run_in_executor(None, dist.check_scheduler, scheduler.address, 10.0)

    asyncio.run(serve())
