"""One search study on a real PostgreSQL server shared by two worker processes.

The server is Debian's PostgreSQL 15, started by ``initdb`` and ``pg_ctl`` in a temporary folder on a
free port (socket in that folder) and stopped afterwards. PostgreSQL refuses to run as root, so as
root (CI) both run as the ``postgres`` system user."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

import edgecompress as ec

BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL URL for the module's tests; the server is stopped and its folder removed after."""
    if not (BIN / "initdb").is_file() or not (BIN / "pg_ctl").is_file():
        pytest.skip(f"PostgreSQL 15 is not installed ({BIN}/initdb and pg_ctl missing; Debian package postgresql-15)")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="edgecompress-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: PostgreSQL refuses to run as root")
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(as_user + list(args), capture_output=True, text=True, timeout=120, cwd=folder)

    r = pg(str(BIN / "initdb"), "-D", str(data), "-U", "edgecompress", "--auth=trust", "-E", "UTF8")
    assert r.returncode == 0, r.stderr
    r = pg(str(BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=50", "start")
    assert r.returncode == 0, r.stderr + (folder / "server.log").read_text()
    try:
        yield f"postgresql://edgecompress@127.0.0.1:{port}/postgres"
    finally:
        pg(str(BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


SPACE = """version: 1
task: digits-lenet300
seed: 0
stages:
  - stage: prune
    sparsity: {range: [0.5, 0.95]}
    finetune: {epochs: 0}
export: [onnx]
measure: {latency: false}
search: {objectives: [metric, bytes], trials: 4, sampler: random, seed: 0, short_epochs: 0}
"""


def test_two_workers_record_every_trial_exactly_once(postgres, tmp_path, task):
    task("digits-lenet300")  # the baseline in the cache before the workers load it
    res = ec.search("digits-lenet300", yaml.safe_load(SPACE), out=tmp_path / "out", storage=postgres,
                    study="two-workers", workers=2)
    numbers = [r.number for r in res.trials]
    # each worker checks the count before it starts a trial, so two may both take the last slot
    assert numbers == list(range(len(numbers))) and 4 <= len(numbers) <= 5
    assert all(r.state == "complete" and r.values["bytes"] > 0 and r.recipe for r in res.trials)
    params = [r.recipe["stages"][0]["sparsity"] for r in res.trials]
    assert len(set(params)) == len(params)  # the workers sampled different trials (seeds differ)
    assert (tmp_path / "out" / "search.json").is_file() and not (tmp_path / "out" / "study.db").exists()
    # the same study again from one process: nothing left to run, nothing repeated
    again = ec.search("digits-lenet300", yaml.safe_load(SPACE), out=tmp_path / "out", storage=postgres,
                      study="two-workers")
    assert [r.number for r in again.trials] == numbers
