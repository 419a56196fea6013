"""The user data terraform renders for gateways and workers calls the real `ember` CLI.

Each module (terraform/modules/workers, terraform/modules/gateway) is copied to a temporary
directory, initialised against the local provider mirror (the CLI config comes from
`terraform/test.sh --cli-config`), and its rendered script is read with `terraform console`.
Every `ember <verb> --flag ...` in the script must name a verb in `ember --help` and flags
in `ember <verb> --help`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.terraform

REPO = Path(__file__).resolve().parents[1]
TERRAFORM_DIR = REPO / "terraform"

COMMON_VARS = {
    "name": "ember",
    "vpc_id": "vpc-0123456789abcdef0",
    "instance_type": "g5.xlarge",
    "instance_profile_name": "ember",
    "ember_package": "ember==0.1.0",
    "region": "us-east-1",
    "redis_host": "master.ember-redis.abc123.use1.cache.amazonaws.com",
    "redis_port": 6379,
    "redis_auth_token_secret_arn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:redis",
    "cluster_token_secret_arn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:cluster",
}

MODULE_VARS = {
    "workers": {
        **COMMON_VARS,
        "subnet_ids": ["subnet-a", "subnet-b"],
        "gateway_security_group_id": "sg-gateway",
        "desired_capacity": 1,
        "max_size": 4,
        "root_volume_size_gb": 200,
        "energy_mode": "actuate",
        "store_url": "s3://ember-ckpt/checkpoints",
    },
    "gateway": {
        **COMMON_VARS,
        "instance_type": "c7i.large",
        "public_subnet_ids": ["subnet-pa", "subnet-pb"],
        "private_subnet_ids": ["subnet-a", "subnet-b"],
        "allowed_ingress_cidrs": ["0.0.0.0/0"],
        "idle_timeout_s": 900,
        "min_size": 1,
        "max_size": 4,
        "desired_capacity": 2,
        "admin_key_secret_arn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:admin",
        "initial_power_budget_w": 5600,
    },
}


@pytest.fixture(scope="module")
def cli_config() -> Path:
    """Path of a terraform CLI config that installs providers from the local mirror only."""
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not on PATH")
    done = subprocess.run(
        ["bash", str(TERRAFORM_DIR / "test.sh"), "--cli-config"], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        pytest.skip(done.stdout.strip() or done.stderr.strip() or "no terraform provider mirror")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def user_data(cli_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The rendered user data of each module, by module name."""
    workdir = tmp_path_factory.mktemp("terraform")
    return {
        module: render_user_data(module, variables, cli_config, workdir)
        for module, variables in MODULE_VARS.items()
    }


@pytest.mark.parametrize(("module", "verb"), [("workers", "worker"), ("gateway", "gateway")])
def test_user_data_calls_existing_cli(module: str, verb: str, user_data: dict[str, str]) -> None:
    script = user_data[module]
    calls = ember_calls(script)
    assert [v for v, _ in calls] == [verb], (
        f"expected one `ember {verb}` in the {module} user data, found {calls}"
    )

    top_help = ember_help([])
    for called_verb, flags in calls:
        assert re.search(rf"^\W*{re.escape(called_verb)}\b", top_help, re.M), (
            f"`ember {called_verb}` (from the {module} user data) is not in `ember --help`:\n{top_help}"
        )
        verb_help = ember_help([called_verb])
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", verb_help)]
        assert not missing, (
            f"`ember {called_verb}` has no {missing} (from the {module} user data):\n{verb_help}"
        )


def test_worker_user_data_follows_variables(user_data: dict[str, str]) -> None:
    ((verb, flags),) = ember_calls(user_data["workers"])
    assert verb == "worker"
    assert flags["--energy-mode"] == "actuate"
    assert flags["--store-url"] == "s3://ember-ckpt/checkpoints"
    assert flags["--redis-url"].startswith("rediss://:")
    assert flags["--redis-url"].endswith("@master.ember-redis.abc123.use1.cache.amazonaws.com:6379/0")
    assert flags["--port"] == "8081" and flags["--host"] == "0.0.0.0"
    assert flags["--advertise-url"] == "http://$private_ip:8081"


def test_gateway_user_data_follows_variables(user_data: dict[str, str]) -> None:
    ((verb, flags),) = ember_calls(user_data["gateway"])
    assert verb == "gateway"
    assert json.loads(flags["--initial-budget-json"]) == {"cluster_watts": 5600}
    assert flags["--redis-url"].startswith("rediss://:")
    assert flags["--port"] == "8000" and flags["--host"] == "0.0.0.0"
    assert "EMBER_ENV=production" in user_data["gateway"]
    assert (
        "EMBER_ENV=production" not in user_data["workers"]
    )  # a worker in production would demand the admin key


@pytest.mark.parametrize("module", ["workers", "gateway"])
def test_user_data_is_valid_bash(module: str, user_data: dict[str, str], tmp_path: Path) -> None:
    """The script and the scripts it writes (quoted heredocs) parse as bash."""
    script = user_data[module]
    embedded = re.findall(r"<<'(SCRIPT|RUN)'\n(.*?)\n\1\n", script, re.S)
    assert embedded, "expected the run script written by a quoted heredoc"
    for i, text in enumerate([script, *(body for _, body in embedded)]):
        path = tmp_path / f"script{i}.sh"
        path.write_text(text)
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (
            f"{module} user data script {i} is not valid bash:\n{done.stderr}\n{text}"
        )


# --- helpers ---------------------------------------------------------------------------------


def render_user_data(module: str, variables: dict, cli_config: Path, tmp_path: Path) -> str:
    """The module's rendered user data, evaluated by terraform itself from its variables."""
    workdir = tmp_path / module
    shutil.copytree(TERRAFORM_DIR / "modules" / module, workdir)
    shutil.copy(TERRAFORM_DIR / ".terraform.lock.hcl", workdir / ".terraform.lock.hcl")
    (workdir / "test.auto.tfvars.json").write_text(json.dumps(variables))
    env = {**os.environ, "TF_CLI_CONFIG_FILE": str(cli_config), "CHECKPOINT_DISABLE": "1", "TF_INPUT": "0"}
    terraform(["init", "-backend=false", "-no-color"], workdir, env)
    out = terraform(["console"], workdir, env, stdin="base64encode(local.user_data)\n")
    return base64.b64decode(out.strip().strip('"')).decode()


def terraform(args: list[str], cwd: Path, env: dict, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["terraform", *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"terraform {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def ember_calls(script: str) -> list[tuple[str, dict[str, str]]]:
    """Every `ember <verb> --flag value ...` the script runs, as (verb, {flag: value})."""
    joined = re.sub(r"\\\n", " ", script)
    calls = []
    for line in joined.splitlines():
        if not re.search(r"(^|[\s\"/])ember\"?\s+[a-z]", line) or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for i, word in enumerate(words[:-1]):
            if Path(word).name == "ember" and re.fullmatch(r"[a-z][a-z-]*", words[i + 1]):
                calls.append((words[i + 1], parse_flags(words[i + 2 :])))
    return calls


def parse_flags(words: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            flags[word] = words[i + 1] if has_value else ""
    return flags


def ember_help(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", *args, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, f"ember {' '.join(args)} --help failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
