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
        "ami_id": "ami-0123456789abcdef0",
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
        "ami_id": "ami-0123456789abcdef0",
        "worker_autoscaling_group_name": "ember-worker-abc",
        "worker_max_size": 8,
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
    assert "--redis-url" not in flags  # the token would show in `ps`: it comes from the 0600 env file
    assert 'f"rediss://:{token}@master.ember-redis.abc123.use1.cache.amazonaws.com:6379/0"' in user_data["workers"]
    assert flags["--port"] == "8081" and flags["--host"] == "0.0.0.0"
    assert flags["--advertise-url"] == "http://$private_ip:8081"


def test_gateway_user_data_follows_variables(user_data: dict[str, str]) -> None:
    ((verb, flags),) = ember_calls(user_data["gateway"])
    assert verb == "gateway"
    assert json.loads(flags["--initial-budget-json"]) == {"cluster_watts": 5600}
    assert "--redis-url" not in flags
    assert flags["--port"] == "8000" and flags["--host"] == "0.0.0.0"
    assert "EMBER_ENV=production" in user_data["gateway"]
    assert (
        "EMBER_ENV=production" not in user_data["workers"]
    )  # a worker in production would demand the admin key


@pytest.mark.parametrize("module", ["workers", "gateway"])
def test_user_data_is_valid_bash(module: str, user_data: dict[str, str], tmp_path: Path) -> None:
    """The script and the scripts it writes (quoted heredocs) parse as bash."""
    script = user_data[module]
    embedded = re.findall(r"<<'(SCRIPT|RUN|SECRETS|LAUNCH)'\n(.*?)\n\1\n", script, re.S)
    assert embedded, "expected the run script written by a quoted heredoc"
    for i, text in enumerate([script, *(body for _, body in embedded)]):
        path = tmp_path / f"script{i}.sh"
        path.write_text(text)
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (
            f"{module} user data script {i} is not valid bash:\n{done.stderr}\n{text}"
        )


# --- the disk step, run against a fake machine --------------------------------------------------

def _disk_script(user_data: dict[str, str]) -> str:
    (body,) = re.findall(r"<<'SCRIPT'\n(.*?)\nSCRIPT\n", user_data["workers"], re.S)
    return body


def _unit(script: str, name: str) -> str:
    """The body of the systemd unit `<name>.service` the script writes."""
    (body,) = re.findall(rf"{re.escape(name)}\.service <<'UNIT'\n(.*?)\nUNIT\n", script, re.S)
    return body


def _run_disk_script(script: str, tmp_path: Path, *, dlami: bool, lsblk_out: str = "",
                     mem_kb: int = 16 * 1024 * 1024, nvme_mounted: bool | None = None,
                     dlami_unit: bool = False, df_bytes: tuple[int, int] | None = None,
                     du_bytes: int | None = None,
                     linked_before: bool = False) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    """Run the worker's disk step with its paths in `tmp_path` and the system tools stubbed (each
    stub logs its call); returns the run, the root of the fake machine and the calls.

    `nvme_mounted`: whether `mountpoint` says a volume is mounted at /opt/dlami/nvme (default: when
    the directory exists); nothing else is mounted. `dlami_unit`: the dlami-nvme unit exists (the
    step then waits for its mount; `sleep` is stubbed). `df_bytes`: (size, avail) that `df` reports;
    `du_bytes`: what `du` says Ember's data directory already holds. `linked_before`: an earlier
    boot left the data directory linked to the DLAMI's volume."""
    root = tmp_path / "machine"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls.log"
    nvme = root / "opt" / "dlami" / "nvme"
    mounted = dlami if nvme_mounted is None else nvme_mounted
    behaviour = {
        # `mountpoint -q PATH`: only the DLAMI's volume can be mounted on the fake machine
        "mountpoint": f'[ "${{@: -1}}" = {shlex.quote(str(nvme))} ] && exit {0 if mounted else 1}; exit 1',
        "systemctl": "exit 0" if dlami_unit else "exit 1",
        "sleep": "exit 0",
        "lsblk": f"printf '%s' {shlex.quote(lsblk_out)}",
        "mount": "exit 0", "mkfs.xfs": "exit 0", "mdadm": "exit 0", "chown": "exit 0",
    }
    if df_bytes is not None:
        size, avail = df_bytes
        behaviour["df"] = (f'case "$*" in *--output=size*) printf \'%s\\n%s\\n\' 1B-blocks {size};; '
                           f"*) printf '%s\\n%s\\n' Avail {avail};; esac")
    if du_bytes is not None:
        behaviour["du"] = f'printf \'%s\\t%s\\n\' {du_bytes} "${{@: -1}}"'
    for name, body in behaviour.items():
        path = stubs / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> {shlex.quote(str(calls))}\n{body}\n')
        path.chmod(0o755)
    if dlami:
        nvme.mkdir(parents=True)
    (root / "mnt").mkdir(parents=True)
    if linked_before:
        (root / "mnt" / "ember").symlink_to(nvme / "ember")
    meminfo = root / "meminfo"
    meminfo.write_text(f"MemTotal:       {mem_kb} kB\nMemFree:        1000 kB\n")
    path = tmp_path / "ember-prepare-disk"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "EMBER_DLAMI_NVME": str(nvme),
           "EMBER_TIER_DATA_DIR": str(root / "mnt" / "ember"), "EMBER_TIER_SHM_DIR": str(root / "run" / "ember-shm"),
           "EMBER_MEMINFO": str(meminfo), "EMBER_TIERS_ENV": str(root / "run" / "ember" / "tiers.env"),
           "EMBER_SERVICE_USER": "root"}
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    logged = calls.read_text().splitlines() if calls.exists() else []
    return done, root, logged


def _tiers(root: Path) -> dict[str, str]:
    text = (root / "run" / "ember" / "tiers.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_disk_step_reuses_the_dlami_instance_store_volume(user_data: dict[str, str], tmp_path: Path) -> None:
    """The DLAMI's dlami-nvme service already built LVM at /opt/dlami/nvme: the SSD tier goes
    there, and nothing touches the (busy) disks under it."""
    done, root, calls = _run_disk_script(_disk_script(user_data), tmp_path, dlami=True)
    assert done.returncode == 0, done.stdout + done.stderr
    data_dir = root / "mnt" / "ember"
    assert data_dir.is_symlink() and data_dir.resolve() == (root / "opt" / "dlami" / "nvme" / "ember").resolve()
    assert not [c for c in calls if c.split()[0] in ("mkfs.xfs", "mdadm", "lsblk")], calls
    tiers = _tiers(root)
    assert int(tiers["EMBER_SSD_CAPACITY_BYTES"]) > 0


def test_disk_step_sizes_the_instance_store_tier_from_its_free_space(user_data: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """The SSD tier takes 90% of what the volume leaves to Ember: its free space plus what Ember
    already keeps there (after a reboot), not 90% of the volume's total size (a volume the AMI or
    anything else already fills would be overcommitted)."""
    gib = 1 << 30
    done, root, calls = _run_disk_script(_disk_script(user_data), tmp_path, dlami=True,
                                         df_bytes=(1000 * gib, 100 * gib), du_bytes=50 * gib)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "mnt" / "ember").is_symlink()
    assert int(_tiers(root)["EMBER_SSD_CAPACITY_BYTES"]) == 150 * gib * 9 // 10


def test_disk_step_falls_back_when_nothing_is_mounted_on_the_dlami_directory(user_data: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """/opt/dlami/nvme exists (the AMI ships it) but its volume never came up within the wait (here
    after a stop and start of a warm-pool worker, whose first boot linked the tier there): the
    directory is on the root volume, so the SSD tier must not be sized as an instance store there,
    and the DLAMI service's disks are left to it."""
    gib = 1 << 30
    done, root, calls = _run_disk_script(_disk_script(user_data), tmp_path, dlami=True, nvme_mounted=False,
                                         dlami_unit=True, df_bytes=(200 * gib, 100 * gib), du_bytes=0,
                                         linked_before=True)
    assert done.returncode == 0, done.stdout + done.stderr
    data_dir = root / "mnt" / "ember"
    assert data_dir.is_dir() and not data_dir.is_symlink()
    assert not (root / "opt" / "dlami" / "nvme" / "ember").exists()
    assert [c for c in calls if c.startswith("sleep")], "the step waits for the DLAMI's volume first"
    assert not [c for c in calls if c.split()[0] in ("lsblk", "mkfs.xfs", "mdadm")], calls
    assert int(_tiers(root)["EMBER_SSD_CAPACITY_BYTES"]) == 50 * gib  # half the root volume's free space


def test_dram_tier_tmpfs_has_an_explicit_size_with_headroom(user_data: dict[str, str], tmp_path: Path) -> None:
    done, root, calls = _run_disk_script(_disk_script(user_data), tmp_path, dlami=True, mem_kb=64 * 1024 * 1024)
    assert done.returncode == 0, done.stdout + done.stderr
    (mount,) = [c for c in calls if c.startswith("mount -t tmpfs")]
    size = int(re.search(r"size=(\d+)", mount).group(1))
    dram = int(_tiers(root)["EMBER_DRAM_CAPACITY_BYTES"])
    assert dram == 32 << 30  # half of 64 GiB
    assert size >= dram + (2 << 30) and size < 64 << 30  # the pool, plus headroom for tokenizer/manifest files
    assert _tiers(root)["EMBER_SHM_DIR"].endswith("run/ember-shm")


def test_disk_step_never_formats_a_disk_in_use_and_never_fails_the_boot(user_data: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """Without the DLAMI volume, an instance-store disk that already holds LVM is left alone and
    the SSD tier stays on the root volume; the step still succeeds (the worker must start)."""
    busy = "/dev/nvme1n1 Amazon EC2 NVMe Instance Storage LVM2_member\n"
    done, root, calls = _run_disk_script(_disk_script(user_data), tmp_path, dlami=False, lsblk_out=busy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [c for c in calls if c.split()[0] in ("mkfs.xfs", "mdadm")], calls
    assert (root / "mnt" / "ember").is_dir() and not (root / "mnt" / "ember").is_symlink()
    assert int(_tiers(root)["EMBER_SSD_CAPACITY_BYTES"]) > 0


def test_blank_instance_store_disks_are_striped_without_force(user_data: dict[str, str], tmp_path: Path) -> None:
    blank = ("/dev/nvme1n1 Amazon EC2 NVMe Instance Storage\n"
             "/dev/nvme2n1 Amazon EC2 NVMe Instance Storage\n")
    done, root, calls = _run_disk_script(_disk_script(user_data), tmp_path, dlami=False, lsblk_out=blank)
    assert done.returncode == 0, done.stdout + done.stderr
    (mdadm,) = [c for c in calls if c.startswith("mdadm")]
    assert "--force" not in mdadm and "/dev/nvme1n1 /dev/nvme2n1" in mdadm
    assert not any(c.startswith("mkfs.xfs") and " -f" in c for c in calls)


def test_worker_unit_does_not_require_the_disk_step(user_data: dict[str, str]) -> None:
    unit = _unit(user_data["workers"], "ember-worker")
    assert "Requires=" not in unit
    assert "ExecStartPre=+/usr/local/sbin/ember-worker-secrets" in unit


def test_worker_unit_start_timeout_outlasts_the_wait_for_the_cluster_token(user_data: dict[str, str]) -> None:
    """ExecStartPre waits for the first gateway to create the cluster token; systemd's default start
    timeout (90 s) would kill that wait and restart it over and over."""
    script = user_data["workers"]
    unit = _unit(script, "ember-worker")
    wait_s = max(int(w) for w in re.findall(r"wait_s=(\d+)", script))
    timeouts = re.findall(r"^TimeoutStartSec=(\d+)(s|min)?$", unit, re.M)
    assert timeouts, f"no TimeoutStartSec in the worker unit:\n{unit}"
    ((value, unit_suffix),) = timeouts
    assert int(value) * (60 if unit_suffix == "min" else 1) > wait_s + 60


# --- the launching lifecycle hook, completed by the node itself ---------------------------------

FAKE_BOTO3 = """
import json, os
from botocore.exceptions import ClientError

class _AutoScaling:
    def __init__(self, region):
        self.region = region

    def complete_lifecycle_action(self, **kwargs):
        with open(os.environ["FAKE_AWS_LOG"], "a") as f:
            f.write(json.dumps({"region": self.region, **kwargs}) + "\\n")
        message = os.environ.get("FAKE_AWS_ERROR")
        if message:
            raise ClientError({"Error": {"Code": "ValidationError", "Message": message}},
                              "CompleteLifecycleAction")

def client(name, region_name=None):
    assert name == "autoscaling", name
    return _AutoScaling(region_name)
"""


def _run_launch_complete(user_data: dict[str, str], tmp_path: Path,
                         error: str | None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the worker's launch-completion script with IMDS (curl) and boto3 faked; returns the run
    and the CompleteLifecycleAction calls it made."""
    (body,) = re.findall(r"<<'LAUNCH'\n(.*?)\nLAUNCH\n", user_data["workers"], re.S)
    script = tmp_path / "ember-launch-complete"
    script.write_text(body)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "curl").write_text('#!/bin/bash\ncase "$*" in *api/token*) echo tok;; *instance-id*) echo i-0123456789abcdef0;; '
                                '*) exit 22;; esac\n')
    (stubs / "sleep").write_text("#!/bin/bash\nexit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    fake = tmp_path / "fake" / "boto3"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_BOTO3)
    log = tmp_path / "aws.log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "EMBER_PYTHON": sys.executable,
           "PYTHONPATH": str(tmp_path / "fake"), "FAKE_AWS_LOG": str(log)}
    if error:
        env["FAKE_AWS_ERROR"] = error
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_launch_completion_continues_the_nodes_own_launch(user_data: dict[str, str], tmp_path: Path) -> None:
    done, calls = _run_launch_complete(user_data, tmp_path, error=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == [{"region": "us-east-1", "LifecycleHookName": "ember-launch",
                      "AutoScalingGroupName": "ember-worker", "InstanceId": "i-0123456789abcdef0",
                      "LifecycleActionResult": "CONTINUE"}]


def test_launch_completion_tolerates_no_active_lifecycle_action(user_data: dict[str, str], tmp_path: Path) -> None:
    """A reboot in service, or a hook that already timed out: nothing waits, and that is no failure."""
    message = "No active Lifecycle Action found with instance ID i-0123456789abcdef0"
    done, calls = _run_launch_complete(user_data, tmp_path, error=message)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(calls) == 1


def test_launch_completion_fails_on_other_errors_after_retrying(user_data: dict[str, str], tmp_path: Path) -> None:
    done, calls = _run_launch_complete(user_data, tmp_path, error="User is not authorized to perform this action")
    assert done.returncode != 0
    assert len(calls) > 1


def test_launch_completion_runs_at_every_boot_after_the_worker(user_data: dict[str, str]) -> None:
    """The launching hook fires again whenever an instance leaves the warm pool, and user data runs
    only on the first boot: the completion is an enabled oneshot unit ordered after the worker's setup."""
    script = user_data["workers"]
    unit = _unit(script, "ember-launch-complete")
    assert "Type=oneshot" in unit and "WantedBy=multi-user.target" in unit
    (after,) = re.findall(r"^After=(.*)$", unit, re.M)
    assert {"ember-disk.service", "ember-worker.service"} <= set(after.split())
    assert "Requires=" not in unit  # a worker that fails to start must not hold its launch for the whole timeout
    (enable,) = re.findall(r"^systemctl enable --now (.*)$", script, re.M)
    assert "ember-launch-complete.service" in enable.split()


# --- terraform versions ------------------------------------------------------------------------

def test_every_module_requires_a_terraform_with_write_only_arguments() -> None:
    """The secrets module writes the cluster token and admin key with `secret_string_wo`, a
    write-only argument that terraform accepts only from 1.11: an older terraform must be refused by
    `required_version`, not fail on the argument (or, worse, store the value)."""
    assert "secret_string_wo" in (TERRAFORM_DIR / "modules" / "secrets" / "main.tf").read_text()
    files = sorted(TERRAFORM_DIR.glob("**/versions.tf")) + [TERRAFORM_DIR / "examples" / "minimal" / "main.tf"]
    files = [f for f in files if ".terraform" not in f.parts]
    assert len(files) >= 8, files
    for path in files:
        (constraint,) = re.findall(r'^\s*required_version\s*=\s*"([^"]+)"', path.read_text(), re.M)
        minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)(?:\.\d+)?", constraint.strip())
        assert minimum, f"{path}: required_version {constraint!r} is not a plain lower bound"
        assert (int(minimum[1]), int(minimum[2])) >= (1, 11), (
            f"{path}: required_version {constraint!r} admits a terraform without write-only arguments (1.11)"
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
