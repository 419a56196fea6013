# Ember's three secrets, kept in Secrets Manager and read by the instances at boot, so they
# never appear in user data or launch templates.
#   redis-auth-token  Redis AUTH (gateways and workers)
#   cluster-token     gateway <-> worker HTTP authentication (gateways and workers)
#   admin-key         the gateway's admin API key (gateways only)
#
# Out of state where the pinned provider (hashicorp/aws 5.100) allows:
# - cluster-token and admin-key: a given value is written with the write-only
#   `secret_string_wo` (never stored in state); a value not given is not made by terraform at
#   all: the first gateway to boot generates it and puts it (one fixed ClientRequestToken, so
#   gateways racing agree on one value), workers wait for it. (An ephemeral random password would
#   do the same inside terraform, but terraform's mock providers cannot serve ephemeral
#   resources, so the offline tests could not run it.)
# - redis-auth-token: the replication group's `auth_token` is not write-only in this provider, so
#   this one value is in state however it is made (Secrets Manager's GetRandomPassword when not
#   given). Keep state encrypted.

locals {
  names = toset(["redis-auth-token", "cluster-token", "admin-key"])
  # Which secrets are given depends on whether a value was given, not on the value.
  redis_generated = nonsensitive(var.redis_auth_token == null)
  given_wo = toset(concat(
    nonsensitive(var.cluster_token != null) ? ["cluster-token"] : [],
    nonsensitive(var.admin_key != null) ? ["admin-key"] : [],
  ))
}

data "aws_secretsmanager_random_password" "redis" {
  count = local.redis_generated ? 1 : 0
  # Letters and digits only: the Redis token goes into a URL, and AUTH refuses @, " and /.
  password_length     = 64
  exclude_punctuation = true
  include_space       = false
}

resource "aws_secretsmanager_secret" "this" {
  for_each                = local.names
  name_prefix             = "${var.name}/${each.key}-"
  description             = "Ember ${each.key}"
  recovery_window_in_days = var.recovery_window_in_days
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "redis" {
  secret_id     = aws_secretsmanager_secret.this["redis-auth-token"].id
  secret_string = local.redis_generated ? data.aws_secretsmanager_random_password.redis[0].random_password : var.redis_auth_token

  lifecycle {
    # the data source answers differently on every plan: the first value generated stays
    ignore_changes = [secret_string]
  }
}

resource "aws_secretsmanager_secret_version" "given" {
  for_each                 = local.given_wo
  secret_id                = aws_secretsmanager_secret.this[each.key].id
  secret_string_wo         = each.key == "admin-key" ? var.admin_key : var.cluster_token
  secret_string_wo_version = var.secret_version
}
