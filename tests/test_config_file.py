"""The configuration file (ORP_CONFIG): validation with one-line errors, precedence, the README's
example, `orp-proxy config check`, keys by reference only."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orp_proxy.cli import main
from orp_proxy.config import ConfigError, load_settings
from orp_proxy.ops.auth import Authenticator

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[upstreams.gpu-a]
url = "http://127.0.0.1:9/v1"
[upstreams.gpu-b]
url = "http://127.0.0.1:10/v1"
[models.chat]
deployments = [{ upstream = "gpu-a", model = "m" }, { upstream = "gpu-b", model = "m" }]
"""


def readme_example() -> str:
    readme = (ROOT / "README.rst").read_text()
    block = readme.split("A complete example", 1)[1].split("::\n", 1)[1]
    block = block.split("\n* **Upstreams**", 1)[0]
    return textwrap.dedent(block)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "orp.toml"
    path.write_text(text)
    return str(path)


def test_the_readme_example_is_valid(tmp_path: Path) -> None:
    settings = load_settings({"ORP_CONFIG": write(tmp_path, readme_example())})
    file = settings.file
    assert file is not None and settings.routed
    assert settings.port == 8080 and settings.model_map == {"gpt-4o-mini": "llama"}
    assert [d.upstream for d in file.models["llama"]] == ["vllm-a", "vllm-b", "azure"]
    assert file.models["llama"][2].weight == 0.1
    assert file.models["qwen"][0].model == "qwen3-4b"
    assert file.upstreams["azure"].quirks == {"max_tokens_field": "max_completion_tokens",
                                              "developer_role": "developer"}
    assert file.upstreams["llamacpp"].quirks["tool_choice_object"] is False
    assert file.upstreams["llamacpp"].quirks["reasoning_field"] == "reasoning_content"
    assert file.upstreams["vllm-a"].quirks == {"extra_body": {"top_k": 20},
                                               "reasoning_field": "reasoning",
                                               "thinking_kwarg": "enable_thinking"}
    assert file.upstreams["llamacpp"].read_timeout == 600
    assert file.routing.sticky == "both" and file.routing.eject_after == 3


def test_environment_wins_over_the_file_and_flags_over_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[settings]\nport = 9001\nlog_level = "debug"\n' + MINIMAL)
    assert load_settings({"ORP_CONFIG": path}).port == 9001
    assert load_settings({"ORP_CONFIG": path, "ORP_PORT": "9002"}).port == 9002
    settings = load_settings({"ORP_CONFIG": path, "ORP_PORT": "9002"}, {"port": "9003"})
    assert settings.port == 9003 and settings.log_level == "debug"
    # A file of settings only: one upstream as before.
    only = write(tmp_path, "[settings]\nport = 9004\n")
    assert not load_settings({"ORP_CONFIG": only}).routed


@pytest.mark.parametrize(("text", "message"), [
    ("[upstreams.a]\nurl = 'http://x/v1'\n", "models: at least one model is needed"),
    (MINIMAL.replace('upstream = "gpu-b"', 'upstream = "gpu-c"'),
     "models.chat.deployments[1].upstream: no upstream named 'gpu-c' (did you mean 'gpu-b'?)"),
    (MINIMAL + "[routing]\nretires = 2\n", "routing.retires: unknown key (did you mean "
     "'retries'?)"),
    (MINIMAL + "[routing]\nsticky = 'yes'\n", "routing.sticky: expected one of none, "),
    (MINIMAL + "[routing]\neject_seconds = 10\neject_max_seconds = 5\n",
     "routing.eject_max_seconds: must be >= eject_seconds"),
    (MINIMAL.replace('url = "http://127.0.0.1:9/v1"', 'url = "gpu-a:8000"'),
     "upstreams.gpu-a.url: expected an http:// or https:// URL"),
    (MINIMAL.replace('url = "http://127.0.0.1:9/v1"', 'url = "http://u:p@h/v1"'),
     "upstreams.gpu-a.url: must not contain credentials"),
    (MINIMAL.replace('url = "http://127.0.0.1:9/v1"',
                     'url = "http://h/v1"\napi_key = "sk-live-123"'),
     "upstreams.gpu-a.api_key: the key itself does not belong in the file"),
    (MINIMAL.replace('url = "http://127.0.0.1:9/v1"',
                     'url = "http://h/v1"\nmax_concurency = 3'),
     "upstreams.gpu-a.max_concurency: unknown key (did you mean 'max_concurrency'?)"),
    (MINIMAL.replace('url = "http://127.0.0.1:9/v1"', 'url = "http://h/v1"\nread_timeout = 0'),
     "upstreams.gpu-a.read_timeout: must be > 0"),
    (MINIMAL.replace('url = "http://127.0.0.1:9/v1"',
                     'url = "http://h/v1"\nextra_body = { stream = false }'),
     "upstreams.gpu-a.extra_body: must not set stream"),
    (MINIMAL.replace('model = "m" }, { upstream = "gpu-b"', 'model = "m", weight = 0 }, '
                     '{ upstream = "gpu-b"'),
     "models.chat.deployments[0].weight: must be > 0"),
    (MINIMAL.replace('"gpu-b", model = "m"', '"gpu-a", model = "m"'),
     "models.chat.deployments[1]: duplicate deployment gpu-a/m"),
    (MINIMAL + "[models.empty]\ndeployments = []\n",
     "models.empty.deployments: expected a non-empty array"),
    (MINIMAL + "[settings]\nprot = 1\n", "settings.prot: unknown setting (did you mean "
     "'port'?)"),
    (MINIMAL + "[settings]\nport = 'eighty'\n", "settings.port="),
    (MINIMAL + "[settings]\napi_keys = 'k1,k2'\n", "settings.api_keys: a secret does not "
     "belong in the file"),
    (MINIMAL + "[routes]\n", "routes: unknown key (did you mean 'routing'?)"),
    ("[models\n", "not valid TOML"),
])
def test_each_problem_is_one_line_naming_the_key(tmp_path: Path, text: str,
                                                 message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings({"ORP_CONFIG": path})
    shown = str(caught.value)
    assert "\n" not in shown
    assert shown.startswith(path + ": ") and message in shown, shown
    assert "sk-live-123" not in shown


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}/nope.toml: cannot read")):
        load_settings({"ORP_CONFIG": str(tmp_path / "nope.toml")})


def test_a_routed_config_without_client_keys_refuses_to_start(tmp_path: Path) -> None:
    settings = load_settings({"ORP_CONFIG": write(tmp_path, MINIMAL)})
    with pytest.raises(ConfigError, match="no client authentication"):
        Authenticator.from_settings(settings)


def test_config_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    example = readme_example()
    key_file = tmp_path / "azure.key"
    key_file.write_text("sk-azure-secret-4242\n")
    (tmp_path / "vllm.key").write_text("sk-vllm-secret\n")
    example = example.replace("/etc/orp-proxy/", f"{tmp_path}/")
    path = write(tmp_path, example)
    monkeypatch.setenv("ORP_PORT", "not-a-port")  # the file is checked, not the environment
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["config", "check", path]) == 1
    err = capsys.readouterr().err
    assert "upstreams.vllm-b.api_key_credential: no systemd credential 'vllm_key'" in err
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vllm_key").write_text("sk-from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert main(["config", "check", path]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"{path}: ok (3 settings, 4 upstreams, 2 models, 4 deployments)")
    key_file.unlink()
    assert main(["config", "check", path]) == 1
    captured = capsys.readouterr()
    assert "cannot read the key of upstream 'azure'" in captured.err
    assert "secret" not in captured.err.replace(str(tmp_path), "")


def test_config_check_as_a_command(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[routing]\nretires = 1\n")
    done = subprocess.run([sys.executable, "-m", "orp_proxy.cli", "config", "check", path],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"orp-proxy: {path}: routing.retires: unknown key "
                                   "(did you mean 'retries'?)")


def test_a_file_of_models_excludes_the_single_upstream_settings(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    load_settings({"ORP_CONFIG": path}).check_upstream()
    for name, value in (("ORP_UPSTREAM_URL", "http://127.0.0.1:1/v1"),
                        ("ORP_MOCK_UPSTREAM", "true")):
        with pytest.raises(ConfigError, match=f"{name} is set, but the ORP_CONFIG file"):
            load_settings({"ORP_CONFIG": path, name: value}).check_upstream()
