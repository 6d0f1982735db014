"""Tests for evserver.config: precedence, parsing per type, strictness and error messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from evserver.config import (
    SETTINGS,
    Config,
    click_options,
    load_config,
    render_default_toml,
    settings_table_markdown,
)
from evserver.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never pick up the repo's config/evserver.toml or the developer's EVSERVER_* vars."""
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("EVSERVER_")]:
        monkeypatch.delenv(var)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg.source is None
    assert cfg.as_dict() == {
        t: {s.key: s.default for s in SETTINGS if s.table == t}
        for t in ("server", "handlers", "dead_letters", "admin", "forward", "security", "tls",
                  "cluster")
    }
    assert (cfg.server.port, cfg.handlers.retries, cfg.server.pid_file) == (7878, 0, None)
    assert cfg.get("dead_letters", "path") == "./evserver-dead-letters"
    assert cfg.origin("server", "port") == "default"


def test_precedence_each_level(tmp_path: Path) -> None:
    f = write(tmp_path / "a.toml", "[server]\nport = 1\npool_size = 2\nqueue_size = 3\n")
    env = {"EVSERVER_SERVER_POOL_SIZE": "20", "EVSERVER_SERVER_QUEUE_SIZE": "30"}
    cfg = load_config(f, env=env, overrides={"server.queue_size": 300, "server.port": None})
    assert (cfg.server.port, cfg.server.pool_size, cfg.server.queue_size) == (1, 20, 300)
    assert cfg.server.max_connections == 10000  # untouched -> default
    assert cfg.origin("server", "port") == str(f)
    assert cfg.origin("server", "pool_size") == "EVSERVER_SERVER_POOL_SIZE"
    assert cfg.origin("server", "queue_size") == "--queue-size"
    assert cfg.source == f


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVSERVER_HANDLERS_RETRIES", "4")
    assert load_config().handlers.retries == 4
    assert load_config(env={}).handlers.retries == 0


@pytest.mark.parametrize(
    ("var", "raw", "attr", "expected"),
    [
        *[("SERVER_MONKEY_PATCH", r, "monkey_patch", True) for r in ("1", "true", "Yes", "ON")],
        *[("SERVER_MONKEY_PATCH", r, "monkey_patch", False) for r in ("0", "False", "no", "off")],
        ("SERVER_PORT", " 8080 ", "port", 8080),
        ("SERVER_DRAIN_TIMEOUT", "2.5", "drain_timeout", 2.5),
        ("SERVER_DRAIN_TIMEOUT", "3", "drain_timeout", 3.0),
        ("SERVER_HOST", "::1", "host", "::1"),
        ("SERVER_PID_FILE", "/run/ev.pid", "pid_file", "/run/ev.pid"),
        ("SERVER_PID_FILE", "", "pid_file", None),
        ("SERVER_WORKERS", "3", "workers", 3),
        ("SERVER_WORKERS", "auto", "workers", os.cpu_count() or 1),
    ],
)
def test_env_parsing(var: str, raw: str, attr: str, expected: object) -> None:
    value = getattr(load_config(env={f"EVSERVER_{var}": raw}).server, attr)
    assert value == expected and type(value) is type(expected)


def test_file_types_and_workers_auto(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", """
[server]
workers = "auto"
drain_timeout = 5
monkey_patch = false
pid_file = ""
[handlers]
backoff = 0.5
retries = "4"  # strings are parsed as in env vars
[dead_letters]
""")
    cfg = load_config(f, env={})
    assert cfg.server.workers == (os.cpu_count() or 1)
    assert cfg.server.drain_timeout == 5.0 and isinstance(cfg.server.drain_timeout, float)
    assert (cfg.server.monkey_patch, cfg.server.pid_file) == (False, None)
    assert (cfg.handlers.backoff, cfg.handlers.retries) == (0.5, 4)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nprot = 1\n",
         "server.prot: unknown setting (from {f}); did you mean 'server.port'?"),
        ("[sever]\nport = 1\n", "sever: unknown table (from {f}); did you mean 'server'?"),
        ("port = 1\n", "port: unknown table (from {f})"),
        ("server = 1\n", "server: expected a table, got 1 (from {f})"),
        ('[server]\nport = "x"\n', "server.port: expected an integer 0-65535, got 'x' (from {f})"),
        ('[server]\nhost = 1\n', "server.host: expected a string, got 1"),
        ("[server]\nport = 1.0\n", "server.port: expected an integer 0-65535, got 1.0"),
        ("[server]\nport = true\n", "server.port: expected an integer 0-65535, got True"),
        ("[server]\nmonkey_patch = 1\n", "server.monkey_patch: expected a boolean"),
        ('[server]\nlog_level = "verbose"\n', "server.log_level: expected one of 'debug', 'info'"),
        ("[server]\nworkers = 0\n", "server.workers: expected an integer >= 1 or 'auto', got 0"),
        ("[server]\nport = \n", "cannot read config file {f}"),
    ],
)
def test_bad_file(tmp_path: Path, toml: str, message: str) -> None:
    f = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError, match=re.escape(message.format(f=f))):
        load_config(f, env={})


@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("SERVER_PORT", "abc",
         "server.port: expected an integer 0-65535, got 'abc' (from EVSERVER_SERVER_PORT)"),
        ("SERVER_PORT", "70000", "server.port: expected an integer 0-65535, got '70000'"),
        ("SERVER_PORT", "", "server.port: expected an integer 0-65535, got ''"),
        ("SERVER_MONKEY_PATCH", "maybe", "server.monkey_patch: expected a boolean"),
        ("SERVER_DRAIN_TIMEOUT", "0", "server.drain_timeout: expected a number > 0, got '0'"),
        ("SERVER_MAX_FRAME_BYTES", "1023", "server.max_frame_bytes: expected an integer >= 1024"),
        ("HANDLERS_BACKOFF", "-1", "handlers.backoff: expected a number >= 0"),
        ("SERVER_WORKERS", "many", "server.workers: expected an integer >= 1 or 'auto'"),
        ("DEAD_LETTERS_PATH", "", "dead_letters.path: expected a non-empty string"),
        ("SERVER_PROT", "1", "EVSERVER_SERVER_PROT: unknown environment variable (from "
         "environment); did you mean 'EVSERVER_SERVER_PORT'?"),
        ("DEAD_LETTERS_PAHT", "x", "did you mean 'EVSERVER_DEAD_LETTERS_PATH'?"),
    ],
)
def test_bad_env(var: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(env={f"EVSERVER_{var}": raw})


def test_env_outside_known_tables_is_ignored() -> None:
    cfg = load_config(env={"EVSERVER_HOME": "/x", "EVSERVER_CLIENT_PORT": "1", "PORT": "1"})
    assert cfg == load_config(env={})


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match=re.escape("server.port: expected an integer 0-65535, "
                                                    "got -1 (from --port)")):
        load_config(env={}, overrides={"server.port": -1})
    message = "server.prot: unknown setting (from overrides)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(env={}, overrides={"server.prot": 1})


def test_missing_explicit_file(tmp_path: Path) -> None:
    write(tmp_path / "config" / "evserver.toml", "")  # not a fallback for an explicit path
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_config(tmp_path / "nope.toml", env={})


def test_default_file_discovered_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "proj" / "config" / "evserver.toml", "[handlers]\nretries = 2\n")
    monkeypatch.chdir(tmp_path / "proj")
    cfg = load_config(env={})
    assert cfg.handlers.retries == 2 and cfg.source == f
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).source is None


def test_immutable_and_replace() -> None:
    cfg = load_config(env={})
    with pytest.raises(AttributeError):
        cfg.server.port = 1
    with pytest.raises(AttributeError):
        cfg.server = None
    with pytest.raises(AttributeError, match=r"server\.nope"):
        _ = cfg.server.nope
    cfg.as_dict()["server"]["port"] = 1
    new = cfg.replace(**{"server.port": 0, "handlers.timeout": "2"})
    assert (new.server.port, new.handlers.timeout, cfg.server.port) == (0, 2.0, 7878)
    assert isinstance(new, Config) and new != cfg
    with pytest.raises(ConfigError):
        cfg.replace(**{"server.pool_size": 0})


def test_default_toml_lists_every_setting_and_parses_to_defaults(tmp_path: Path) -> None:
    shipped = (REPO / "config" / "evserver.toml").read_text()
    assert shipped == render_default_toml(), "regenerate: python -m evserver.config > config/..."
    uncommented = re.sub(r"^# (\w+ = )", r"\1", shipped, flags=re.M)
    f = write(tmp_path / "all.toml", uncommented)
    assert load_config(f, env={}) == load_config(env={})
    for s in SETTINGS:
        assert f"\n# {s.key} = " in shipped and s.env_var in shipped


def test_markdown_table() -> None:
    md = settings_table_markdown().splitlines()
    assert md[0] == "| Setting | Env var | Default | Description |"
    assert len(md) == 2 + len(SETTINGS)
    assert "| `server.port` | `EVSERVER_SERVER_PORT` | `7878` |" in md[2 + [
        s.name for s in SETTINGS].index("server.port")]


def test_click_options_feed_overrides() -> None:
    @click.command()
    @click_options
    def main(overrides: dict[str, object]) -> None:
        cfg = load_config(env={"EVSERVER_SERVER_POOL_SIZE": "9"}, overrides=overrides)
        click.echo(f"{cfg.server.port} {cfg.server.pool_size} {cfg.server.monkey_patch} "
                   f"{cfg.handlers.retries} {cfg.server.workers}")

    result = CliRunner().invoke(main, ["--port", "0", "--no-monkey-patch", "--handlers-retries",
                                       "3", "--workers", "auto"])
    assert result.output == f"0 9 False 3 {os.cpu_count() or 1}\n", result.output
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "EVSERVER_SERVER_PORT" in help_text and "--dead-letters-fsync-interval" in help_text


def test_readme_settings_table_is_current():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- settings:begin -->\n")[1].split("<!-- settings:end -->")[0]
    assert table == settings_table_markdown(), "regenerate: python -m evserver.config --markdown"


def test_forward_users_pairs() -> None:
    key = {"EVSERVER_FORWARD_SHARED_KEY": "s3cret"}
    cfg = load_config(env={**key, "EVSERVER_FORWARD_USERS": "alice:pw:1, bob:x"})
    assert cfg.forward.users == {"alice": "pw:1", "bob": "x"}  # parsed once, when read
    with pytest.raises(ConfigError, match=r"forward.users: expected name:password pairs"):
        load_config(env={**key, "EVSERVER_FORWARD_USERS": "alice"})


@pytest.mark.parametrize(("env", "message"), [
    ({"EVSERVER_FORWARD_USERS": "a:b"},
     "forward.users: a user handshake needs a shared key too (forward.shared_key); "
     "forward.users came from EVSERVER_FORWARD_USERS"),
    ({"EVSERVER_FORWARD_TLS": "true"}, "forward.tls: TLS needs a certificate (tls.cert)"),
])
def test_settings_that_need_another_one(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert message in str(info.value)
