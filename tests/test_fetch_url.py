"""serving.fetch_url against a local HTTP server: every redirect hop is checked, non-public addresses need the
host listed by name (or allow_private), and size and time are capped."""
import http.server
import io
import threading
import time

import pytest

from visualglm import serving
from visualglm.errors import UserError

LOCAL = ("127.0.0.1",)


def png_bytes():
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


PNG = png_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /img.png, redirects (/redirect, /to-localhost, /to-file, /loop, /no-location), /big (with
    Content-Length), /endless (no Content-Length, never ends), /slow-body and /slow-headers (a byte every
    0.2 s), anything else 404. Every path asked for is appended to server.hits."""

    def do_GET(self):   # noqa: N802 - http.server's name
        self.server.hits.append(self.path)
        port = self.server.server_address[1]
        redirects = {"/redirect": "/img.png", "/to-localhost": f"http://localhost:{port}/img.png",
                     "/to-file": "file:///etc/passwd", "/loop": "/loop", "/no-location": None}
        try:
            if self.path == "/img.png":
                self.reply(200, PNG, length=len(PNG))
            elif self.path in redirects:
                self.send_response(302)
                if redirects[self.path]:
                    self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/big":
                self.reply(200, b"x" * 5000, length=5000)
            elif self.path == "/endless":
                self.reply(200, b"", length=None)
                while True:
                    self.wfile.write(b"x" * 4096)
            elif self.path == "/slow-body":
                self.reply(200, b"", length=100)
                self.drip(b"x" * 100)
            elif self.path == "/slow-headers":
                self.drip(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n" + b"X-Pad: " + b"y" * 200)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up, as these tests expect
            pass

    def reply(self, status, body, length):
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def drip(self, data):
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hits = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def url(server, path, host="127.0.0.1"):
    return f"http://{host}:{server.server_address[1]}{path}"


def test_an_image_on_a_host_listed_by_ip_is_fetched_even_on_loopback(server):
    assert serving.fetch_url(url(server, "/img.png"), LOCAL, 10000) == PNG


def test_a_host_not_allowed_is_refused_before_connecting(server):
    before = len(server.hits)
    with pytest.raises(UserError, match=r"host 'localhost' is not allowed.*--allow_remote_images localhost$"):
        serving.fetch_url(url(server, "/img.png", "localhost"), LOCAL, 10000)
    assert len(server.hits) == before


def test_a_redirect_on_an_allowed_host_is_followed(server):
    assert serving.fetch_url(url(server, "/redirect"), LOCAL, 10000) == PNG


def test_a_redirect_to_a_host_not_allowed_is_refused_naming_it(server):
    with pytest.raises(UserError, match=r"/to-localhost redirects to host 'localhost', which is not allowed"):
        serving.fetch_url(url(server, "/to-localhost"), LOCAL, 10000)


def test_a_redirect_to_a_loopback_name_allowed_only_by_the_wildcard_is_refused(server):
    """127.0.0.1 is listed by name, localhost only through '*': its loopback address is refused."""
    with pytest.raises(UserError, match=r"host 'localhost'.* is loopback, not public"):
        serving.fetch_url(url(server, "/to-localhost"), ("*", "127.0.0.1"), 10000)


def test_a_redirect_to_another_scheme_is_refused(server):
    with pytest.raises(UserError, match=r"redirects to 'file:///etc/passwd', which is not http\(s\)"):
        serving.fetch_url(url(server, "/to-file"), LOCAL, 10000)


def test_a_redirect_loop_is_refused(server):
    before = len(server.hits)
    with pytest.raises(UserError, match=rf"more than {serving.MAX_REDIRECTS} redirects"):
        serving.fetch_url(url(server, "/loop"), LOCAL, 10000)
    assert server.hits[before:] == ["/loop"] * (serving.MAX_REDIRECTS + 1)


def test_a_redirect_without_location_is_refused(server):
    with pytest.raises(UserError, match="HTTP 302 redirect without a Location header"):
        serving.fetch_url(url(server, "/no-location"), LOCAL, 10000)


def test_a_content_length_above_the_limit_is_refused_before_the_body(server):
    with pytest.raises(serving.TooLarge, match="larger than 1000 bytes"):
        serving.fetch_url(url(server, "/big"), LOCAL, 1000)


def test_a_body_without_content_length_stops_past_the_limit(server):
    start = time.monotonic()
    with pytest.raises(serving.TooLarge, match="larger than 100000 bytes"):
        serving.fetch_url(url(server, "/endless"), LOCAL, 100000, timeout=5)
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_a_server_dripping_bytes_fails_after_the_timeout(server, path):
    start = time.monotonic()
    with pytest.raises(UserError, match="no complete answer within 1 s"):
        serving.fetch_url(url(server, path), LOCAL, 10000, timeout=1)
    assert time.monotonic() - start < 3


def test_a_404_is_a_user_error(server):
    with pytest.raises(UserError, match=r"cannot fetch the image .*/missing.png: HTTP 404 Not Found"):
        serving.fetch_url(url(server, "/missing.png"), LOCAL, 10000)


def test_a_refused_connection_is_a_user_error():
    with pytest.raises(UserError, match=r"cannot fetch the image http://127.0.0.1:1/x.png: .*refused"):
        serving.fetch_url("http://127.0.0.1:1/x.png", LOCAL, 10000)


def test_the_wildcard_does_not_allow_loopback(server):
    before = len(server.hits)
    with pytest.raises(UserError, match=r"host '127.0.0.1'.* is loopback, not public"):
        serving.fetch_url(url(server, "/img.png"), ("*",), 10000)
    assert len(server.hits) == before


def test_allow_private_allows_loopback_with_the_wildcard(server):
    assert serving.fetch_url(url(server, "/redirect"), ("*",), 10000, allow_private=True) == PNG


@pytest.mark.parametrize("host, kind", [("[::ffff:127.0.0.1]", "loopback"), ("10.1.2.3", "private"),
                                        ("169.254.169.254", "link-local"), ("100.64.0.1", "shared"),
                                        ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast")])
def test_non_public_literals_are_refused_before_connecting(server, host, kind):
    before = len(server.hits)
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"its address [0-9.]+ is {kind}"):
        serving.fetch_url(url(server, "/img.png", host), ("*",), 10000, timeout=5)
    assert time.monotonic() - start < 1 and len(server.hits) == before
