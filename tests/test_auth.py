"""The real `lora-workbench ui` with credentials (here from $LORA_WORKBENCH_AUTH, read like --auth): before login
only the login page is served, and wrong passwords from one address have to wait longer and longer."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from app.login_guard import FREE_TRIES
from app.server import AUTH_ENV
from tests.browser_support import Server

USER, PASSWORD, WRONG = "tester", "right-horse-battery", "wrong-staple-guess"
APP_TEXT = "Fine-tune an LLM with LoRA"  # the page's own header, part of its component config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("auth")
    srv = Server(root / "runs", root / "server.log")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(AUTH_ENV, f"{USER}:{PASSWORD}")
        srv.start()
    yield srv
    srv.stop()


def page_data(html: str) -> tuple[dict, dict]:
    """The config and API schema a Gradio page embeds (window.gradio_config, window.gradio_api_info)."""
    found = {
        name: json.loads(value)
        for name, value in re.findall(r"<script>window\.(gradio_config|gradio_api_info) = (.*?);</script>", html)
    }
    return found["gradio_config"], found["gradio_api_info"]


def login(client: httpx.Client, password: str, user: str = USER) -> httpx.Response:
    """Gradio's login form as its page sends it (multipart form fields)."""
    return client.post("login", files={"username": (None, user), "password": (None, password)})


def test_before_login_only_the_login_page_is_served(server: Server) -> None:
    page = httpx.get(server.url)
    assert page.status_code == 200
    config, api_info = page_data(page.text)
    assert config["auth_required"] is True and config["components"] == []
    assert api_info == {}, "the login page must not carry the app's API schema"
    assert APP_TEXT not in page.text
    paths = ("config", "gradio_api/info", "gradio_api/runs", "gradio_api/app_id", "gradio_api/user", "lwb-stamp/train")
    for path in paths:
        assert httpx.get(server.url + path).status_code == 401, path
    assert httpx.get(server.url + "theme.css").status_code == 200  # what the login page itself needs


def test_a_correct_login_gets_the_full_page(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert login(client, PASSWORD).status_code == 200
        page = client.get("")
        config, api_info = page_data(page.text)
        assert APP_TEXT in page.text and config["components"]
        assert api_info["named_endpoints"]
        assert client.get("config").status_code == 200
        assert set(client.get("lwb-stamp/train?key=").json()) == {"stamp", "next"}  # the page's poller, signed in


def test_wrong_passwords_make_the_address_wait_longer_each_time(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        for _ in range(FREE_TRIES):
            assert login(client, WRONG, user="intruder").status_code == 400
        refused = login(client, PASSWORD)  # even the right password waits: the lockout does not check it
        assert refused.status_code == 429 and "wait 1 s" in refused.json()["detail"]
        spoofed = client.post(  # a made-up client address in a header does not start a fresh count
            "login",
            files={"username": (None, USER), "password": (None, PASSWORD)},
            headers={"X-Forwarded-For": "10.9.9.9"},
        )
        assert spoofed.status_code == 429
        time.sleep(int(refused.headers["Retry-After"]))
        assert login(client, WRONG, user="intruder").status_code == 400
        refused = login(client, WRONG, user="intruder")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"  # the wait doubles
        time.sleep(2)
        assert login(client, PASSWORD).status_code == 200  # the owner gets in once it has passed
        assert client.get("config").status_code == 200
    log = server.log.read_text()
    assert f"failed login for user 'intruder' from 127.0.0.1 ({FREE_TRIES} in a row" in log
    assert "login refused for user 'tester' from 127.0.0.1: too many failed logins" in log
    assert PASSWORD not in log and WRONG not in log
