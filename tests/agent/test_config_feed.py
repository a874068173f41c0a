"""The agent polls the proxy's /config_dump with If-None-Match: a 304 (no body) while the version in
force is the one it has, the whole config once it changes."""

from __future__ import annotations

import json
from pathlib import Path

from dataplane.agent.agent import fetch
from tests.conftest import free_port, wait_for
from tests.proxy.test_sidecar import Proxy, tcp_config


def test_config_dump_answers_304_while_the_version_is_unchanged(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, tcp_config("v1", free_port(), free_port()), workers=1)
    url = f"http://127.0.0.1:{proxy.admin}/config_dump"
    try:
        assert wait_for(proxy.ready, 15)
        status, body = fetch(url, 5.0)
        assert status == 200 and json.loads(body)["version"] == "v1"
        assert fetch(url, 5.0, headers={"if-none-match": '"v1"'}) == (304, "")
        proxy.reload(tcp_config("v2", free_port(), free_port()))
        assert wait_for(lambda: fetch(url, 5.0, headers={"if-none-match": '"v1"'})[0] == 200, 10)
        status, body = fetch(url, 5.0, headers={"if-none-match": '"v1"'})
        assert json.loads(body)["version"] == "v2" and json.loads(body)["config"]["version"] == "v2"
    finally:
        assert proxy.stop() == 0
