"""The command line as an operator meets it: client commands that find the server ``serve``
was configured for, payloads too large for one argument, exit codes and messages.

Servers are real ``evserver serve`` subprocesses (``server_factory``); the commands run in
process through click's runner, in a temporary directory so that its
``config/evserver.toml`` is the only one found.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import APPS, REPO, ServerFactory, ServerProcess, free_port
from tlscerts import make_pki

from evserver import App
from evserver.cli import main
from evserver.deadletters import DeadLetter, DeadLetterStore
from evserver.testing import serve_in_thread

KEY = "k" * 24


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(f"{APPS}/basic.py:app")


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no ``EVSERVER_*`` variable of the developer."""
    for var in [v for v in os.environ if v.startswith("EVSERVER_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str, env: dict[str, str] | None = None, input: Any = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def write_config(directory: Path, text: str) -> Path:
    path = directory / "config" / "evserver.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------ point 1: client commands read serve's config


def test_client_commands_read_the_port_from_config_file(server: ServerProcess, cwd: Path) -> None:
    write_config(cwd, f"[server]\nport = {server.port}\n")
    result = invoke("ping")
    assert result.exit_code == 0, result.output
    assert f"pong from 127.0.0.1:{server.port}" in result.stdout
    result = invoke("request", "echo", '{"a": 1}')
    assert result.exit_code == 0 and json.loads(result.stdout) == {"a": 1}
    assert invoke("send", "echo", "1", "--ack").exit_code == 0


def test_client_commands_read_an_explicit_config_and_the_server_env(
        server: ServerProcess, cwd: Path) -> None:
    other = cwd / "elsewhere.toml"
    other.write_text(f'[server]\nhost = "0.0.0.0"\nport = {server.port}\n')
    result = invoke("ping", "--config", str(other))  # listening everywhere: reach loopback
    assert result.exit_code == 0 and f"127.0.0.1:{server.port}" in result.stdout, result.output
    result = invoke("ping", env={"EVSERVER_SERVER_PORT": str(server.port)})
    assert result.exit_code == 0, result.output
    # The documented aliases and the flag still win over the config's layers.
    write_config(cwd, "[server]\nport = 1\n")
    assert invoke("ping", env={"EVSERVER_PORT": str(server.port)}).exit_code == 0
    assert invoke("ping", "--port", str(server.port)).exit_code == 0
    result = invoke("ping", "--config", str(cwd / "missing.toml"))
    assert result.exit_code == 2 and "config file not found" in result.stderr


def test_client_commands_use_the_configured_shared_key(server_factory: ServerFactory,
                                                       cwd: Path) -> None:
    server = server_factory(f"{APPS}/basic.py:app", env={"EVSERVER_SHARED_KEY": KEY})
    assert invoke("ping", "--port", str(server.port)).exit_code == 1  # no key: refused
    write_config(cwd, f'[server]\nport = {server.port}\n[security]\nshared_key = "{KEY}"\n')
    result = invoke("request", "echo", "[1, 2]")
    assert result.exit_code == 0 and json.loads(result.stdout) == [1, 2], result.output
    # A rotation table: the last key is the newest.
    write_config(cwd, f'[server]\nport = {server.port}\n[security.shared_keys]\n'
                      f'old = "{"o" * 16}"\nnew = "{KEY}"\n')
    assert invoke("ping").exit_code == 1  # the server holds only the "default" key
    result = invoke("ping", "--key-id", "default", "--shared-key", KEY)
    assert result.exit_code == 0, result.output


def run_serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``evserver serve`` in a clean environment; for commands that exit by themselves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "evserver", "serve", *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def test_client_commands_use_the_configured_tls(cwd: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    app = App()
    app.processor("echo")(lambda event: event.data)
    with serve_in_thread(app, settings=pki.settings()) as server:
        port = server.address[1]
        assert invoke("ping", "--port", str(port), "--timeout", "2").exit_code == 1  # plain
        write_config(cwd, f'[server]\nport = {port}\n[tls]\ncert = "{pki.server_cert}"\n'
                          f'key = "{pki.server_key}"\nca = "{pki.ca}"\n')
        result = invoke("request", "echo", "[5]")
        assert result.exit_code == 0 and json.loads(result.stdout) == [5], result.output


def test_dead_letters_replay_reaches_the_configured_server(server: ServerProcess,
                                                          cwd: Path) -> None:
    with DeadLetterStore(str(cwd / "dl")) as store:
        store.append(DeadLetter("echo", {"n": 1}, "dl-1", 1.5, {}, "app.echo", "processor",
                                "ValueError", "bad", "Traceback...", 1, 100.0))
    write_config(cwd, f'[server]\nport = {server.port}\n[dead_letters]\npath = "dl"\n')
    result = invoke("dead-letters", "replay")
    assert result.exit_code == 0 and result.stdout == "replayed 1, failed 0\n", result.output
    with DeadLetterStore(str(cwd / "dl")) as store:
        assert list(store.read()) == []


# ---------------------------------------------- point 2: an app import error shows a traceback


BROKEN_APP = '''\
from evserver import App

app = App()
SETTINGS = {}
timeout = SETTINGS["x"]
'''


@pytest.mark.parametrize("workers", ["1", "2"])
def test_app_import_error_logs_the_traceback(tmp_path: Path, workers: str) -> None:
    app = tmp_path / "broken_app.py"
    app.write_text(BROKEN_APP)
    result = run_serve(f"{app}:app", "--port", "0", "--no-admin-enabled", "--workers", workers,
                       cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "cannot import" in result.stderr and "KeyError: 'x'" in result.stderr
    assert "Traceback (most recent call last):" in result.stderr
    assert f'File "{app}", line 5, in <module>' in result.stderr
    assert 'timeout = SETTINGS["x"]' in result.stderr
    assert "importlib" not in result.stderr and "loader.py" not in result.stderr


# ------------------------------------------------ point 3: a busy admin port refuses the start


@pytest.mark.parametrize("workers", ["1", "2"])
def test_busy_admin_port_refuses_to_start(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port()
        result = run_serve(f"{APPS}/basic.py:app", "--port", str(port), "--admin-port",
                           str(busy), "--workers", workers, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert f"refusing to start: cannot listen for admin on 127.0.0.1:{busy}" in result.stderr
        assert "--no-admin-enabled" in result.stderr and "Traceback" not in result.stderr
        # No event was ever served without its admin listener.
        assert "evserver ready" not in result.stderr and "master ready" not in result.stderr
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_busy_admin_port_is_fine_with_admin_disabled(server_factory: ServerFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        server = server_factory(f"{APPS}/basic.py:app", "--admin-port", busy,
                                "--no-admin-enabled")
        assert invoke("ping", "--port", str(server.port)).exit_code == 0


# --------------------------------------------- point 4: payloads from stdin and @file


def test_payloads_beyond_one_argument_from_stdin_and_file(server: ServerProcess,
                                                          cwd: Path) -> None:
    big = {"blob": "x" * 300_000}  # more than one argv string may hold (128 KiB)
    port = str(server.port)
    result = invoke("request", "echo", "-", "--port", port, input=json.dumps(big))
    assert result.exit_code == 0, result.output[-300:]
    assert json.loads(result.stdout) == big
    (cwd / "big.json").write_text(json.dumps(big))
    result = invoke("request", "echo", "@big.json", "--port", port)
    assert result.exit_code == 0 and json.loads(result.stdout) == big
    result = invoke("send", "echo", "@big.json", "--ack", "--port", port)
    assert result.exit_code == 0 and result.stdout.strip()
    # Beyond the server's max_frame_bytes (1 MiB): refused before sending, one line.
    (cwd / "huge.json").write_text(json.dumps({"blob": "x" * 1_100_000}))
    result = invoke("request", "echo", "@huge.json", "--port", port)
    assert result.exit_code == 1 and "max_frame_bytes=1048576" in result.stderr
    assert result.stderr.count("\n") == 1
    result = invoke("request", "echo", "@missing.json", "--port", port)
    assert result.exit_code == 2 and "cannot read missing.json" in result.stderr
    result = invoke("request", "echo", "-", "--port", port, input="{nope")
    assert result.exit_code == 2 and "not valid JSON (from stdin)" in result.stderr


# ----------------------------------------------------------- point 5: what startup says


def test_startup_log_names_version_config_addresses_and_sizes(server_factory: ServerFactory,
                                                              tmp_path: Path) -> None:
    from evserver import __version__

    config = tmp_path / "prod.toml"
    config.write_text("[server]\npool_size = 7\n")
    server = server_factory(f"{APPS}/basic.py:app", "--config", str(config),
                            "--forward-enabled", "--forward-port", "0", "--security-debug")
    log = server.log()
    assert f"evserver {__version__} (Python " in log
    assert f"config file {config}; environment EVSERVER_ADMIN_PORT; flags " in log
    assert "--forward-enabled" in log
    assert ("1 worker, pool 7 and queue 256 per worker; [forward] 127.0.0.1:0, "
            "[admin] 127.0.0.1:0") in log
    assert f"listening on 127.0.0.1:{server.port} (pool 7)" in log
    assert "Forward protocol listening on 127.0.0.1:" in log
    assert "admin listening on http://127.0.0.1:" in log
    assert "WARNING evserver: [security] debug is on" in log
    plain = server_factory(f"{APPS}/basic.py:app")
    assert "no config file (config/evserver.toml not in" in plain.log()
    assert "debug is on" not in plain.log()


# ------------------------------------------------- point 6: evserver check and evserver config


def test_check_validates_config_imports_the_app_and_lists_routes(cwd: Path) -> None:
    result = invoke("check", f"{APPS}/basic.py:app")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config ok: no config file")
    assert re.search(r"^processor +echo +basic\.echo +timeout=0\.0 ", result.stdout, re.M)
    write_config(cwd, '[server]\nport = "x"\n')
    result = invoke("check", f"{APPS}/basic.py:app")
    assert result.exit_code == 2 and "server.port: expected an integer" in result.stderr
    (cwd / "config" / "evserver.toml").unlink()
    result = invoke("check", f"{APPS}/basic.py:app", "--port", "1", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "refusing to listen" in result.stderr
    (cwd / "broken_app.py").write_text(BROKEN_APP)
    result = invoke("check", "broken_app.py:app")
    assert result.exit_code == 4 and "KeyError: 'x'" in result.stderr
    assert 'line 5, in <module>' in result.stderr
    result = invoke("check", "no_such_module_here:app")
    assert result.exit_code == 4 and "No module named 'no_such_module_here'" in result.stderr


def test_config_prints_effective_settings_with_sources_and_masks_secrets(cwd: Path) -> None:
    path = write_config(cwd, f'[server]\nport = 9000\n[security]\nshared_key = "{KEY}"\n'
                             f'[security.shared_keys]\nold = "{"o" * 16}"\n')
    result = invoke("config", "--pool-size", "3",
                    env={"EVSERVER_ADMIN_TOKEN": "tok-secret", "EVSERVER_HANDLERS_RETRIES": "2"})
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["server.port"] == ["9000", str(path.absolute())]
    assert lines["server.pool_size"] == ["3", "--pool-size"]
    assert lines["handlers.retries"] == ["2", "EVSERVER_HANDLERS_RETRIES"]
    assert lines["server.host"] == ['"127.0.0.1"', "default"]
    assert lines["admin.token"] == ['"********"', "EVSERVER_ADMIN_TOKEN"]
    assert KEY not in result.stdout and "tok-secret" not in result.stdout
    assert "o" * 16 not in result.stdout
    doc = json.loads(invoke("config", "--json").stdout)
    assert doc["security.shared_keys"] == {"value": {"old": "********"},
                                           "source": str(path.absolute())}
    assert doc["admin.token"] == {"value": None, "source": "default"}
    result = invoke("config", env={"EVSERVER_SERVER_PROT": "1"})
    assert result.exit_code == 2 and "EVSERVER_SERVER_PORT" in result.stderr


def test_config_module_help_prints_usage_not_the_template() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    env["PYTHONPATH"] = str(REPO)
    run = [sys.executable, "-m", "evserver.config"]
    result = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    assert "[server]" not in result.stdout
    result = subprocess.run([*run, "--bogus"], capture_output=True, text=True, env=env,
                            timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr and not result.stdout
    result = subprocess.run(run, capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0 and result.stdout == (REPO / "config/evserver.toml").read_text()


# --------------------------------------------------------------- point 16: the small ones


ORDERED_APP = '''\
from evserver import App

app = App()


@app.processor("acct.*", ordered_by="account")
def account(event):
    return None


@app.processor("ping")
def ping(event):
    return None


@app.listener("**")
def everything(event):
    pass
'''


def test_handlers_list_ordered_by_for_every_processor(cwd: Path) -> None:
    (cwd / "ordered_app.py").write_text(ORDERED_APP)
    result = invoke("check", "ordered_app.py:app")
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines()[2:]}
    assert rows["acct.*"].endswith("ordered_by=account")
    assert rows["ping"].endswith("ordered_by=-")
    assert "ordered_by" not in rows["**"]


def test_a_failing_handler_logs_its_traceback(server: ServerProcess) -> None:
    """Point 2's other half: the server log (not the client) gets the handler's traceback."""
    result = invoke("request", "fail", '"boom"', "--port", str(server.port))
    assert result.exit_code == 1 and "ValueError: boom" in result.stderr
    assert "Traceback" not in result.stderr  # clients get type and message only
    log = server.log()
    assert "Traceback (most recent call last):" in log
    assert re.search(r'File ".*basic\.py", line \d+, in fail', log), log
    assert 'raise ValueError(event.data or "bad id")' in log


def test_timeout_zero_and_bad_types_are_usage_errors(server: ServerProcess) -> None:
    result = invoke("ping", "--timeout", "0", "--port", str(server.port))
    assert result.exit_code == 2 and "'--timeout': 0.0 is not in the range x>0" in result.stderr
    for command in (["request", ""], ["send", "a b"], ["request", "order.*", "1"]):
        result = invoke(*command, "--port", str(server.port))
        assert result.exit_code == 2, (command, result.output)
        assert "Invalid value for 'TYPE': an event type must be" in result.stderr


def test_shell_completion_is_documented_and_works() -> None:
    readme = (REPO / "README.md").read_text()
    assert 'eval "$(_EVSERVER_COMPLETE=bash_source evserver)"' in readme
    script = Path(sys.executable).parent / "evserver"  # the console script pip installed
    env = {**os.environ, "_EVSERVER_COMPLETE": "bash_complete", "COMP_WORDS": "evserver che",
           "COMP_CWORD": "1"}
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0 and "plain,check" in result.stdout.splitlines()
    env["_EVSERVER_COMPLETE"] = "bash_source"
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0 and "_evserver_completion()" in result.stdout


# ------------------------------------------------------------- point 15: evserver top


def read_until(proc: subprocess.Popen[bytes], *texts: bytes, timeout: float = 20) -> bytes:
    """What ``proc`` wrote until its last screen (after the last clear) holds all ``texts``
    (bounded); fails if it never does."""
    import select
    import time

    out = b""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while not all(t in out.rsplit(b"\x1b[2J", 1)[-1] for t in texts):
        assert time.monotonic() < deadline, out[-3000:]
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, out[-3000:]
            out += chunk
    return out


def test_top_waits_for_a_restarting_server_and_fits_80_columns(
        server_factory: ServerFactory) -> None:
    admin = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVSERVER_")}
    env.update(PYTHONPATH=str(REPO), COLUMNS="80")
    top = subprocess.Popen(
        [sys.executable, "-m", "evserver", "top", "--interval", "0.1", "--iterations", "300",
         "--admin", f"http://127.0.0.1:{admin}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        screen = read_until(top, b"waiting for the server")
        assert b"Connection refused" in screen and top.poll() is None
        server = server_factory(f"{APPS}/basic.py:app", "--admin-port", str(admin))
        assert invoke("send", "echo", "1", "--ack", "--port", str(server.port)).exit_code == 0
        screen = read_until(top, b"echo", b"latency is sampled", b"QUEUED  ERRORS\n")
        frame = screen.rsplit(b"\x1b[2J", 1)[-1].decode()
        assert max(len(line) for line in frame.splitlines()) <= 80, frame
    finally:
        top.kill()
        top.wait()
