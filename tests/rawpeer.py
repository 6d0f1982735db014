"""A raw protocol peer for tests that must control the exact bytes on the wire."""

from __future__ import annotations

import socket
import time

from evserver import protocol as p


class RawPeer:
    """A blocking socket plus a client-side FrameReader; every wait is bounded."""

    def __init__(self, address, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.reader = p.FrameReader(p.CLIENT_RECEIVES)
        self.frames: list[p.Frame] = []
        self.timeout = timeout
        hello = self.recv_frames(1)[0]
        assert hello.kind == p.HELLO, hello

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frames(self, n: int) -> list[p.Frame]:
        """Return the next ``n`` frames, reading as needed."""
        deadline = time.monotonic() + self.timeout
        while len(self.frames) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"got {len(self.frames)} of {n} frames")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"EOF after {len(self.frames)} of {n} frames")
            self.reader.receive_data(data)
            self.frames.extend(self.reader)
        out, self.frames = self.frames[:n], self.frames[n:]
        return out

    def by_corr(self, n: int) -> dict[int, p.Frame]:
        return {f.corr: f for f in self.recv_frames(n)}

    def request(self, corr: int, type: str, data=None) -> p.Frame:
        self.send(p.encode_event(corr, [type, data], request=True))
        return self.recv_frames(1)[0]

    def read_until_eof(self) -> bytes:
        chunks = []
        while chunk := self.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()
