"""The HTTP providers' shared client sends exactly what `requests.Session.request` would: the session's headers,
auth and cookies, the environment's proxies, and each request's own query, body and headers."""
from __future__ import annotations

import pytest
import requests

from providers.http import HttpClient
from workflow.runtime import http_session
from tests.httpstub import StubServer

SHAPES = {
    "xml body": dict(method="POST", data="<request><id>1</id></request>".encode("windows-1251"),
                     headers={"Content-Type": "application/xml", "Accept": "*/*"}),
    "form": dict(method="POST", data={"phone": "79161234567", "text": "Привет & co"}),
    "query": dict(method="GET", params={"phone": "+79161234567", "text": "a b&c"}),
}


def _plain_session() -> requests.Session:
    session = requests.Session()
    session.headers["X-Tenant"] = "callcentre"
    session.auth = ("user", "secret")
    return session


SESSIONS = {"runtime's session": http_session, "a session with headers and auth": _plain_session}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", SESSIONS)
def test_each_request_is_what_the_session_itself_would_send(shape, which):
    method, args = SHAPES[shape]["method"], {k: v for k, v in SHAPES[shape].items() if k != "method"}
    with StubServer(b"OK") as stub:
        url = stub.url + "/api"
        session = SESSIONS[which]()
        client = HttpClient(timeout=5, session=session)
        for _ in range(2):  # the second request reuses what the first prepared
            answer = client._request(method, url, **args)
            assert (answer.status, answer.body) == (200, b"OK")
        session.request(method, url, timeout=5, allow_redirects=False, **args).close()
        session.close()
    first, second, theirs = stub.requests
    assert first == second == theirs
    assert stub.request_headers[0] == stub.request_headers[1] == stub.request_headers[2]


def test_cookies_follow_the_session_jar():
    with StubServer(b"OK") as stub:
        session = requests.Session()
        session.cookies.set("route", "node1")
        client = HttpClient(timeout=5, session=session)
        client._request("GET", stub.url + "/api", params={"n": "1"})
        session.cookies.clear()
        client._request("GET", stub.url + "/api", params={"n": "2"})
        stub.headers = {"Set-Cookie": "route=node2; Path=/"}
        client._request("GET", stub.url + "/api", params={"n": "3"})
        client._request("GET", stub.url + "/api", params={"n": "4"})
    cookies = [headers.get("Cookie") for headers in stub.request_headers]
    assert cookies == ["route=node1", None, None, "route=node2"]
    assert [path for _, path, _ in stub.requests] == ["/api?n=1", "/api?n=2", "/api?n=3", "/api?n=4"]


def test_a_proxy_from_the_environment_is_used(monkeypatch):
    with StubServer(b"OK") as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("http_proxy", raising=False)  # the lower-case name would win
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = HttpClient(timeout=5)  # its own session, reading the environment as requests does
        answer = client._request("GET", "http://provider.invalid/api", params={"n": "1"})
        client.close()
    assert answer.body == b"OK"
    assert proxy.requests == [("GET", "http://provider.invalid/api?n=1", b"")]


def test_the_ca_bundle_named_by_the_environment_is_used(monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca-bundle.pem")
    client = HttpClient(timeout=5)
    with pytest.raises(OSError, match="/nonexistent/ca-bundle.pem"):
        client._request("GET", "https://127.0.0.1:9/api")
    client.close()
