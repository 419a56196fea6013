#!/usr/bin/env bash
# Offline terraform checks, run by `make test`: fmt, init against a local provider mirror,
# validate (root module and examples/minimal) and `terraform test` (mocked aws provider).
# No network and no AWS credentials are needed. Prints SKIP and exits 0 when terraform or
# the mirror is missing.
#
#   bash terraform/test.sh                 run the checks
#   bash terraform/test.sh --cli-config    only write the CLI config and print its path
#                                          (exit 2 with a SKIP line when it cannot)
#
# The mirror is the folder holding registry.terraform.io/hashicorp/aws/<version>/; set
# EMBER_TF_PROVIDER_MIRROR to name it, otherwise a few usual places are searched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cli_config="$here/.tfcli.rc"

skip() {
  echo "SKIP terraform tests: $1"
  if [ "${mode:-}" = "--cli-config" ]; then exit 2; fi
  exit 0
}

# The provider version the committed lock file pins.
aws_version() {
  sed -n '/hashicorp\/aws"/,/}/s/^ *version *= *"\([^"]*\)".*/\1/p' "$here/.terraform.lock.hcl" | head -n 1
}

find_mirror() {
  local version="$1" root found
  if [ -n "${EMBER_TF_PROVIDER_MIRROR:-}" ]; then
    [ -d "$EMBER_TF_PROVIDER_MIRROR/registry.terraform.io/hashicorp/aws/$version" ] && echo "$EMBER_TF_PROVIDER_MIRROR"
    return 0
  fi
  for root in /opt/tf-plugins /opt/terraform/plugins /usr/local/share/terraform/plugins \
    /usr/share/terraform/plugins "${HOME:-/root}/.terraform.d/plugins" \
    "${HOME:-/root}/.local/share/terraform/plugins" /opt/terraform-plugins; do
    if [ -d "$root/registry.terraform.io/hashicorp/aws/$version" ]; then
      echo "$root"
      return 0
    fi
  done
  # A bounded search of the places a mirror is usually unpacked.
  found="$(find /opt /usr/local /usr/share /srv /root /home -maxdepth 6 -type d \
    -path "*/registry.terraform.io/hashicorp/aws/$version" 2>/dev/null | head -n 1 || true)"
  [ -n "$found" ] && echo "${found%/registry.terraform.io/hashicorp/aws/$version}"
  return 0
}

mode="${1:-}"
command -v terraform >/dev/null || skip "terraform not on PATH"
version="$(aws_version)"
[ -n "$version" ] || skip "no hashicorp/aws version in $here/.terraform.lock.hcl"
mirror="$(find_mirror "$version")"
[ -n "$mirror" ] || skip "no local mirror of hashicorp/aws $version (set EMBER_TF_PROVIDER_MIRROR to the folder holding registry.terraform.io/)"

# Only the mirror: without a `direct` block terraform never goes to the network.
cat >"$cli_config" <<CONFIG
provider_installation {
  filesystem_mirror {
    path    = "$mirror"
    include = ["registry.terraform.io/hashicorp/*"]
  }
}
CONFIG

if [ "$mode" = "--cli-config" ]; then
  echo "$cli_config"
  exit 0
fi

export TF_CLI_CONFIG_FILE="$cli_config" TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1 TF_INPUT=0
color=()
[ -t 1 ] || color=(-no-color)

echo "terraform: provider mirror $mirror (hashicorp/aws $version)"
cd "$here"
set -x
terraform fmt -check -recursive -diff
terraform init "${color[@]}" -backend=false -lockfile=readonly >/dev/null
terraform validate "${color[@]}"
terraform -chdir=examples/minimal init "${color[@]}" -backend=false -lockfile=readonly >/dev/null
terraform -chdir=examples/minimal validate "${color[@]}"
terraform test "${color[@]}"
