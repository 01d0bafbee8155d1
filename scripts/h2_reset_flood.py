"""Does an Envoy listener close a connection that resets many streams? (nghttp2's rapid-reset limit)

Opens one plaintext HTTP/2 connection to 127.0.0.1:PORT, sends N HEADERS frames each followed at once
by RST_STREAM(CANCEL), and reports whether a GOAWAY came back. nghttp2 (Envoy's default codec) sends
GOAWAY once a connection has reset more than 1,000 streams (burst; 33/s refill); oghttp2 has no such
limit. Used to check that `http2_protocol_options.use_oghttp2_codec` on a listener switches that
listener's server codec (docs/decisions.md, "oghttp2 on the sidecars' listeners only"). Envoy's own
premature-reset check (codec independent: more than half of >= 500 streams reset within 1 s) also
closes such a connection: give the Envoy under test the runtime key
`overload.premature_reset_total_stream_count` a high value to see the codec alone.

    python scripts/h2_reset_flood.py PORT [N]
"""

from __future__ import annotations

import socket
import struct
import sys
import time

# HPACK: :method POST, :scheme http, :path /xx, :authority x, content-type application/grpc.
HEADER_BLOCK = b"\x83\x86\x04\x03/xx\x01\x01x\x0f\x10\x10application/grpc"
GOAWAY, HEADERS, RST_STREAM, SETTINGS = 7, 1, 3, 4
END_HEADERS, CANCEL = 0x4, 8


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def flood(port: int, n: int) -> int | None:
    """The GOAWAY's error code, or None if the connection stayed open."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
        out = b""
        for i in range(n):
            stream = 2 * i + 1
            out += frame(HEADERS, END_HEADERS, stream, HEADER_BLOCK)
            out += frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))
            if len(out) > 16384:
                sock.sendall(out)
                out = b""
        sock.sendall(out)
        sock.settimeout(0.5)
        data = b""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    pos = 0
    while pos + 9 <= len(data):
        length, ftype = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3]
        if ftype == GOAWAY:
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


def main() -> int:
    port, n = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1200
    code = flood(port, n)
    print(
        f"{n} stream resets on one connection: " + ("no GOAWAY" if code is None else f"GOAWAY, error {code}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
