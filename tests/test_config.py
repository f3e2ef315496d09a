"""The config file and the CLI: errors stop the process before it serves, flags win, defaults hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import __version__
from gateway.cli import build_parser
from gateway.commands.serve import resolve_config
from gateway.config import DEFAULT_ALGORITHMS, Config, ConfigError, config_from_mapping, load_config
from gateway.policy.loader import default_policy_dir, resolve_policy_dir
from tests.support.issuer import AUDIENCE, TestIssuer
from tests.support.processes import REPO, GatewayProcess, free_port, health_status, wait_for_port, wait_until

CLI = str(Path(sys.executable).with_name("authz-gateway"))


def serve_once(config_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`authz-gateway serve --config FILE`, expected to stop on its own (a config error)."""
    return subprocess.run(
        [CLI, "serve", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd or REPO,
        env={"OTEL_SDK_DISABLED": "true", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    return TestIssuer("RS256", serve=False).write_jwks(tmp_path / "jwks.json")


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def base_config(jwks_file: Path, port: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "auth": {
            "issuers": [
                {"issuer": "https://idp.example.test", "audiences": [AUDIENCE], "jwks_file": str(jwks_file)}
            ]
        },
    }


# ---------------------------------------------------------------- errors exit before serving


@pytest.mark.parametrize(
    ("change", "key", "detail"),
    [
        (lambda c: c.update(listne="127.0.0.1:1"), "(top level)", "unknown key 'listne'"),
        (lambda c: c["auth"].update(leewey="30s"), "auth", "unknown key 'leewey'"),
        (
            lambda c: c["auth"]["issuers"][0].update(jwks_url="http://x"),
            "auth.issuers[0]",
            "unknown key 'jwks_url'",
        ),
        (lambda c: c.update(session={"tll": "1h"}), "session", "unknown key 'tll'"),
        (lambda c: c["auth"].update(leeway="30 parsecs"), "auth.leeway", "not a duration"),
        (lambda c: c["auth"].update(leeway="-5s"), "auth.leeway", "not a duration"),
        (lambda c: c["auth"].update(jwks_cooldown=True), "auth.jwks_cooldown", "not a duration"),
        (lambda c: c.update(session={"ttl": "forever"}), "session.ttl", "not a duration"),
        (
            lambda c: c["auth"]["issuers"][0].update(jwks_file="missing/jwks.json"),
            "auth.issuers[0].jwks_file",
            "JWKS file not found",
        ),
        (
            lambda c: c["auth"]["issuers"][0].update(algorithms=["HS256"]),
            "auth.issuers[0].algorithms",
            "HS256",
        ),
        (lambda c: c.update(listen="nowhere"), "listen", "HOST:PORT"),
        (lambda c: c["auth"].update(allow_anonymous="yes"), "auth.allow_anonymous", "true or false"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_config_errors_exit_before_serving_and_name_the_key_and_file(
    tmp_path: Path, jwks_file: Path, change: Any, key: str, detail: str
) -> None:
    port = free_port()
    config = base_config(jwks_file, port)
    change(config)
    path = write_config(tmp_path, config)
    result = serve_once(path)
    assert result.returncode == 2, result
    message = result.stderr.strip().splitlines()[-1]
    assert str(path) in message
    assert f"{key}:" in message
    assert detail in message
    assert "listening" not in result.stderr
    with pytest.raises(TimeoutError):  # and nothing ever listened on the configured port
        wait_for_port(port, timeout=0.2)


def test_a_missing_jwks_file_names_the_resolved_path(tmp_path: Path, jwks_file: Path) -> None:
    config = base_config(jwks_file, free_port())
    config["auth"]["issuers"][0]["jwks_file"] = "keys/absent.json"  # relative to the config file
    path = write_config(tmp_path, config)
    result = serve_once(path)
    assert result.returncode == 2
    assert str(tmp_path / "keys" / "absent.json") in result.stderr
    assert "auth.issuers[0].jwks_file" in result.stderr


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = serve_once(missing)
    assert result.returncode == 2 and str(missing) in result.stderr and "cannot read" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: 127.0.0.1:1\nauth:\n  issuers: [\n")
    result = serve_once(broken)
    assert result.returncode == 2 and f"{broken}:" in result.stderr and "invalid YAML" in result.stderr
    not_a_mapping = write_config(tmp_path, ["a", "b"], "list.yaml")  # type: ignore[arg-type]
    result = serve_once(not_a_mapping)
    assert result.returncode == 2 and "must be a mapping" in result.stderr


def test_invalid_yaml_is_located_where_the_mistake_is(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    # An unclosed quote: reported at the end of the file (6:1) before, not where it opens.
    path.write_text('listen: 127.0.0.1:9191\nstore: memory://\nauth:\n  realm: "authz\nworkers: 2\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}:4:10: invalid YAML: found unexpected end of stream "
        "(a quoted string that starts here is never closed)"
    )
    # A character YAML refuses: its line and column (there were none).
    path.write_text("listen: 127.0.0.1:9191\nstore: memory:\x07//\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}:2:15: invalid YAML: unacceptable character #x0007: special characters are not allowed"
    )


def test_a_jwks_file_that_is_not_a_jwks_exits_non_zero(tmp_path: Path, jwks_file: Path) -> None:
    jwks_file.write_text('{"not": "a jwks"}')
    result = serve_once(write_config(tmp_path, base_config(jwks_file, free_port())))
    assert result.returncode == 2
    assert str(jwks_file) in result.stderr and "JWKS" in result.stderr


def test_unknown_keys_are_found_at_every_level() -> None:
    with pytest.raises(ConfigError, match=r"conf\.yaml: telemetry: unknown key 'colour'"):
        config_from_mapping({"telemetry": {"colour": "blue"}}, "conf.yaml")
    with pytest.raises(ConfigError, match=r"conf\.yaml: admin: unknown key 'port'"):
        config_from_mapping({"admin": {"port": 1}}, "conf.yaml")


def test_a_config_file_error_is_located_where_the_key_is(tmp_path: Path) -> None:
    """Errors in a file say file:line:col, like policy errors: the value at fault, or the key
    that should not be there."""
    path = tmp_path / "gateway.yaml"
    cases = [
        ("listen: 127.0.0.1:9191\nsession:\n  ttl: banana\n", "3:8: session.ttl: not a duration"),
        ("listen: 127.0.0.1:9191\nbogus: 1\n", "2:1: (top level): unknown key 'bogus'"),
        ("listen: 127.0.0.1:9191\ntelemetry:\n\n  colour: red\n", "4:3: telemetry: unknown key 'colour'"),
        ("listen: nope\n", "1:9: listen: not HOST:PORT"),
        (
            "auth:\n  issuers:\n    - issuer: https://a\n      jwks_uri: https://a/k\n      audiences: [x]\n"
            "    - issuer: https://b\n      jwks_uri: 7\n      audiences: [x]\n",
            "7:17: auth.issuers[1].jwks_uri:",
        ),
        ("handles:\n  ttl: .inf\n", "2:8: handles.ttl: must be a finite duration longer than 0s"),
        ("handles:\n  expired_retention: -5\n", "2:22: handles.expired_retention: a duration cannot"),
        ("handles:\n  expired_retention: .inf\n", "2:22: handles.expired_retention: must be finite"),
        ("handles:\n  expired_retention: soon\n", "2:22: handles.expired_retention: not a duration"),
        ("session:\n  ttl: .inf\n", "2:8: session.ttl: must be a finite duration longer than 0s"),
        ("session:\n  ttl: 0\n", "2:8: session.ttl: must be a finite duration longer than 0s"),
        ("session:\n  idle_timeout: 0s\n", "2:17: session.idle_timeout: must be a finite duration longer"),
        ("session:\n  store_timeout: 0\n", "2:18: session.store_timeout: must be a finite duration longer"),
        ("session:\n  store_timeout: .nan\n", "2:18: session.store_timeout: must be a finite duration"),
        ("shutdown_grace: .inf\n", "1:17: shutdown_grace: must be a finite duration"),
        ("reload_debounce: .inf\n", "1:18: reload_debounce: must be a finite duration"),
        (
            "session:\n  key_prefix: 'a:'\nhandles:\n  key_prefix: 'a:b'\n",
            "4:15: handles.key_prefix: must not overlap",
        ),
        (
            "auth:\n  issuers:\n    - issuer: https://a\n      jwks_uri: https://a/k\n      audiences: [x]\n"
            "admin:\n  token_issuer: https://b\n",
            "7:17: admin.token_issuer: 'https://b' is not one of auth.issuers (configured: 'https://a')",
        ),
        # A key that is missing: where its mapping starts.
        (
            "auth:\n  issuers:\n    - issuer: https://a\n      jwks_uri: https://a/k\n",
            "3:7: auth.issuers[0].audiences",
        ),
    ]
    for text, expected in cases:
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(caught.value).startswith(f"{path}:{expected}"), (text, str(caught.value))


def test_zero_is_a_grace_and_a_debounce_but_not_a_session_duration() -> None:
    config = config_from_mapping({"shutdown_grace": "0s", "reload_debounce": 0}, "conf.yaml")
    assert (config.shutdown_grace, config.reload_debounce) == (0.0, 0.0)
    for key in ("ttl", "idle_timeout", "store_timeout"):
        expected = rf"conf\.yaml: session\.{key}: must be a finite duration longer"
        with pytest.raises(ConfigError, match=expected):
            config_from_mapping({"session": {key: "0s"}}, "conf.yaml")


# ---------------------------------------------------------------- flags override the file


def test_flags_override_the_file(tmp_path: Path, jwks_file: Path) -> None:
    file_port, flag_port = free_port(), free_port()
    file_policies = tmp_path / "file-policies"
    flag_policies = tmp_path / "flag-policies"
    for directory in (file_policies, flag_policies):
        directory.mkdir()
        (directory / "10-binding.yaml").write_text(
            (default_policy_dir() / "10-mcp-session-binding.yaml").read_text()
        )
    config = {**base_config(jwks_file, file_port), "policies": str(file_policies), "store": "memory://"}
    gateway = GatewayProcess(
        config,
        tmp_path,
        wait=False,
        extra_args=[
            "--listen",
            f"127.0.0.1:{flag_port}",
            "--policies",
            str(flag_policies),
            "--store",
            "memory://",
        ],
    )
    try:
        gateway.address = f"127.0.0.1:{flag_port}"
        gateway.wait_serving()
        log = gateway.log_text()
        assert f"policies from {flag_policies}" in log
        assert str(file_policies) not in log
        with pytest.raises(TimeoutError):
            wait_for_port(gateway.port, timeout=0.3)  # the file's port (GatewayProcess wrote it there)
    finally:
        assert gateway.stop() == 0


def test_flags_override_the_file_in_the_resolved_config(tmp_path: Path, jwks_file: Path) -> None:
    path = write_config(tmp_path, {**base_config(jwks_file, 7001), "store": "memory://", "policies": "p"})
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:7002",
            "--store",
            "redis://127.0.0.1:6390/1",
            "--policies",
            str(tmp_path / "q"),
        ]
    )
    config = resolve_config(args)
    assert config.listen == "127.0.0.1:7002"
    assert config.store == "redis://127.0.0.1:6390/1"
    assert config.policies == (tmp_path / "q").resolve()
    assert config.auth.issuers[0].jwks_file == jwks_file  # everything else still from the file
    # Without flags, the file's values stand.
    config = resolve_config(build_parser().parse_args(["serve", "--config", str(path)]))
    assert (config.listen, config.store, config.policies) == ("127.0.0.1:7001", "memory://", (tmp_path / "p"))


def test_a_bad_listen_flag_is_an_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [CLI, "serve", "--listen", "not-an-address"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={"OTEL_SDK_DISABLED": "true"},
    )
    assert result.returncode == 2
    assert "not-an-address" in result.stderr


# ---------------------------------------------------------------- defaults


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve_config(build_parser().parse_args(["serve"]))
    assert config.listen == "127.0.0.1:9191"
    assert config.store == "memory://"
    assert config.policies is None
    assert config == Config()
    assert config.auth.leeway == 30.0 and config.auth.allow_anonymous is False
    assert config.auth.max_token_bytes == 16 * 1024
    entry = config_from_mapping(
        {"auth": {"issuers": [{"issuer": "i", "audiences": ["a"], "jwks_uri": "http://x"}]}}
    )
    assert entry.auth.issuers[0].algorithms == DEFAULT_ALGORITHMS == ("RS256", "ES256", "EdDSA")
    # policies: ./policies when it holds policy files, else the packaged default.
    monkeypatch.chdir(tmp_path)
    assert resolve_policy_dir(None) == default_policy_dir()
    assert (default_policy_dir() / "10-mcp-session-binding.yaml").is_file()
    (tmp_path / "policies").mkdir()
    assert resolve_policy_dir(None) == default_policy_dir()  # empty: still the default
    (tmp_path / "policies" / "20-mine.yaml").write_text("name: mine\nrules: []\n")
    assert resolve_policy_dir(None) == (tmp_path / "policies").resolve()


def test_defaults_in_a_running_process(tmp_path: Path) -> None:
    """No config file, no ./policies: the packaged default policy and the memory store."""
    port = free_port()
    process = subprocess.Popen(
        [CLI, "serve", "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={"OTEL_SDK_DISABLED": "true"},
    )
    try:
        wait_until(lambda: health_status(f"127.0.0.1:{port}") == "SERVING", timeout=20, what="SERVING")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    assert f"policies from {default_policy_dir()}" in output
    assert "store memory://" in output


def test_the_example_config_loads() -> None:
    config = load_config(REPO / "examples" / "gateway.yaml")
    assert config.listen == "127.0.0.1:9191"
    assert config.auth.issuers[0].jwks_file == (REPO / "examples" / "keys" / "jwks.json").resolve()
    assert config.auth.resource_metadata
    assert config.session.bind_on == "response"  # with the ext_proc filter of examples/envoy/envoy.yaml


def test_session_bind_on() -> None:
    assert config_from_mapping({}, "conf.yaml").session.bind_on == "first_use"
    for value in ("first_use", "response"):
        assert config_from_mapping({"session": {"bind_on": value}}, "conf.yaml").session.bind_on == value
    for bad in ("Response", "", "request", 1, ["response"]):
        with pytest.raises(ConfigError, match=r"conf\.yaml: session\.bind_on: "):
            config_from_mapping({"session": {"bind_on": bad}}, "conf.yaml")


# ---------------------------------------------------------------- --version


def test_version() -> None:
    for argv in ([CLI, "--version"], [sys.executable, "-m", "gateway", "--version"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 0, result
        assert result.stdout.strip() == f"authz-gateway {__version__}"


def test_no_command_prints_help_and_fails() -> None:
    result = subprocess.run([CLI], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2
    assert "serve" in result.stdout


def test_expired_handles_are_kept_as_long_as_the_ttl_unless_told() -> None:
    assert config_from_mapping({}, "c.yaml").handles.expired_retention == 24 * 3600
    assert config_from_mapping({"handles": {"ttl": "1h"}}, "c.yaml").handles.expired_retention == 3600
    told = config_from_mapping({"handles": {"ttl": "1h", "expired_retention": "0s"}}, "c.yaml")
    assert told.handles.ttl == 3600 and told.handles.expired_retention == 0
