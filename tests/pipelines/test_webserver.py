"""`dagster dev` in a subprocess with a fresh DAGSTER_HOME on a free port: the GraphQL API lists the assets, and
a run of the cheap ``preflight`` job is launched, dequeued by the daemon and succeeds."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from dagster_graphql import DagsterGraphQLClient

from pipelines.home import ensure_dagster_home
from pipelines.resources import PROJECT_ROOT
from pipelines.stages import STAGES

START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240
ASSETS_QUERY = "{ assetNodes { assetKey { path } groupName } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dagster_dev(tmp_path):
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(ensure_dagster_home(tmp_path / "home")),
           "SFD_STORAGE_ROOT": str(tmp_path / "artifacts"), "SFD_PROFILE": "tiny"}
    log = open(tmp_path / "dagster_dev.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-m", "pipelines.definitions",
                                "-h", "127.0.0.1", "-p", str(port)], cwd=str(PROJECT_ROOT), env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "dagster dev did not come up"
            time.sleep(2)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the group this fixture started: webserver, daemon, code server
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
def test_dagster_dev_lists_assets_and_runs_a_job(dagster_dev):
    url = f"http://127.0.0.1:{dagster_dev}/graphql"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # the code location may still be loading after the server answers
        nodes = requests.post(url, json={"query": ASSETS_QUERY}, timeout=30).json().get("data", {}).get("assetNodes")
        if nodes or time.monotonic() > deadline:
            break
        time.sleep(2)
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes or []}
    assert {name: groups.get(name) for name in STAGES} == {name: spec.group for name, spec in STAGES.items()}

    client = DagsterGraphQLClient("127.0.0.1", port_number=dagster_dev)
    run_id = client.submit_job_execution("preflight")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = client.get_run_status(run_id).value
    while status not in ("SUCCESS", "FAILURE", "CANCELED") and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_run_status(run_id).value
    assert status == "SUCCESS"
