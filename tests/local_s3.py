"""Object storage on loopback for the tests and benches: moto's S3 server, and a counting, delaying proxy before it.

`MotoServer` is the S3 API; its endpoint goes in AWS_ENDPOINT_URL. Object storage answers a request
after 20-50 ms, moto on loopback after about 1: `S3Proxy` adds `delay_s` to every request before
passing it on, and logs each one (method, path, Range header, start and end on its clock, and how
many requests were in flight when it started, itself included), so that a test counts what a reader
asked of the store and whether its requests overlapped. A request's log line is written before its
answer is sent: once a client has its answer, it is counted.

The proxy is a process of its own (`python tests/local_s3.py UPSTREAM --delay-ms 30 --log FILE`), so
its threads take nothing from the GIL of the reader being measured. Each of the two runs in a process
session of its own, which `stop` ends.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from process_groups import stop_process_group

START_SECONDS = 60
# moto and the proxy exit at once on SIGTERM; a server still up after this is killed.
SERVER_STOP_GRACE_S = 15
# Headers that describe one hop's connection, not the request (RFC 9110 7.6.1); http.client sets its own.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class MotoServer:
    """moto's S3 server on a free loopback port, its output in `log_path`."""

    def __init__(self, log_path: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # an error status is an answer too
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not answer on {self.endpoint}; see {log_path}")
                time.sleep(0.2)

    @property
    def client_environment(self) -> dict[str, str]:
        """What an S3 client (boto3, pyarrow, Ray's workers) reads to reach this server: AWS_ENDPOINT_URL and
        moto's stand-in credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        stop_process_group(self._process, SERVER_STOP_GRACE_S)
        self._log.close()


class S3Proxy:
    """One proxy process in front of `upstream` (http://host:port): `endpoint` is where clients send requests."""

    def __init__(self, upstream: str, log_path: str, delay_s: float = 0.0):
        self.log_path = log_path
        self._process = subprocess.Popen(
            [sys.executable, __file__, upstream, "--delay-ms", str(delay_s * 1000), "--log", log_path],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            # Its first line is the port it bound, printed once it accepts connections.
            port = self._first_line(START_SECONDS)
        except BaseException:
            self.stop()
            raise
        self.endpoint = f"http://127.0.0.1:{port}"

    def _first_line(self, timeout_s: float) -> int:
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self._process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not found or not found[0].strip().isdigit():
            raise RuntimeError(f"the S3 proxy did not start within {timeout_s} s (it said {found!r})")
        return int(found[0])

    @property
    def endpoint_query(self) -> str:
        """The proxy as a URI query: a store path with `?<this>` is read through it."""
        return f"endpoint_override={self.endpoint.split('://', 1)[1]}&scheme=http"

    def requests(self) -> list[dict]:
        """Every request answered so far, in the order they were answered."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def stop(self) -> None:
        stop_process_group(self._process, SERVER_STOP_GRACE_S)
        self._process.stdout.close()


def most_in_flight(requests: list[dict]) -> int:
    """The most requests the server was answering at once."""
    return max((request["in_flight"] for request in requests), default=0)


def _handler(upstream: str, delay_s: float, log):
    host_port = urllib.parse.urlsplit(upstream).netloc
    lock = threading.Lock()
    in_flight = [0]

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect

        def setup(self) -> None:
            super().setup()
            # An answer goes out in two writes (head, body): with Nagle's algorithm the body would wait for the
            # client's delayed ACK of the head, up to 40 ms, on top of the delay the proxy is asked to add.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _forward(self) -> None:
            with lock:
                in_flight[0] += 1
                record = {"method": self.command, "path": self.path, "range": self.headers.get("Range")}
                record.update(start=time.monotonic(), in_flight=in_flight[0])
            try:
                body = self._body()
                time.sleep(delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                connection = http.client.HTTPConnection(host_port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    answer = connection.getresponse()
                    payload = answer.read()
                    reply_headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_HEADERS]
                    status = answer.status
                finally:
                    connection.close()
            finally:
                with lock:
                    in_flight[0] -= 1
            record.update(end=time.monotonic(), status=status, bytes=len(payload))
            with lock:
                log.write(json.dumps(record) + "\n")
                log.flush()
            self.send_response_only(status)
            for name, value in reply_headers:
                if name.lower() != "content-length":
                    self.send_header(name, value)
            # A HEAD answer announces the object's length without a body: moto's figure, not the empty payload's.
            length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _body(self):
            """The request's body, whole: by its Content-Length, or chunk by chunk (how pyarrow uploads a part)."""
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the chunk's closing CRLF
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, up to the blank line
                pass
            return b"".join(chunks)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:  # the JSON log is the record; stderr stays quiet
            pass

    return Forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="the S3 server, http://host:port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added before passing each request on")
    parser.add_argument("--log", required=True, help="JSON Lines file: one line per request answered")
    options = parser.parse_args()
    with open(options.log, "a", encoding="utf-8") as log:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(options.upstream, options.delay_ms / 1000, log))
        server.daemon_threads = True
        print(server.server_address[1], flush=True)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        server.serve_forever()


if __name__ == "__main__":
    main()
