# The whole deployment wired together, and the variable validations.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  ember_package   = "ember==0.1.0"
  gateway_ami_id  = "ami-0aaaaaaaaaaaaaaaa"
  worker_ami_id   = "ami-0bbbbbbbbbbbbbbbb"
  certificate_arn = "arn:aws:acm:us-east-1:123456789012:certificate/abc"
}

run "defaults_deploy" {
  command = apply

  assert {
    condition     = var.worker_desired_capacity == 1 && var.energy_mode == "recommend"
    error_message = "One worker in recommend mode by default."
  }

  assert {
    condition     = output.gateway_url == "https://${output.alb_dns_name}"
    error_message = "The gateway URL is the load balancer's, over HTTPS."
  }

  assert {
    condition     = module.workers.ami_id == "ami-0bbbbbbbbbbbbbbbb" && module.gateway.ami_id == "ami-0aaaaaaaaaaaaaaaa"
    error_message = "Pinned AMIs, chosen by the operator (not SSM's latest at plan time)."
  }

  assert {
    condition     = strcontains(module.gateway.user_data, "EMBER_AWS_AUTOSCALING_GROUP=${output.worker_autoscaling_group_name}")
    error_message = "The gateways' node scaler drives this deployment's worker group."
  }

  assert {
    condition     = strcontains(module.workers.user_data, "group='${output.worker_autoscaling_group_name}'") && output.worker_autoscaling_group_name == "ember-worker"
    error_message = "A worker completes its launch hook in its own group, whose name it knows before the group exists."
  }

  assert {
    condition     = output.checkpoint_store_url == "s3://${output.bucket_name}/checkpoints"
    error_message = "The store URL is the bucket's checkpoint prefix."
  }

  assert {
    condition     = output.redis_port == 6379 && output.redis_endpoint != ""
    error_message = "Redis endpoint and port are exported."
  }

  assert {
    condition     = keys(output.secret_arns) == ["admin-key", "cluster-token", "redis-auth-token"]
    error_message = "The three secrets are exported."
  }

  assert {
    condition     = strcontains(module.workers.user_data, "--store-url '${output.checkpoint_store_url}'")
    error_message = "Workers read the deployment's own bucket."
  }

  assert {
    condition     = strcontains(module.workers.user_data, "@${output.redis_endpoint}:6379/0") && strcontains(module.gateway.user_data, "@${output.redis_endpoint}:6379/0")
    error_message = "Gateways and workers use the deployment's Redis."
  }

  assert {
    condition     = strcontains(module.workers.user_data, "--energy-mode recommend")
    error_message = "The default energy mode is recommend."
  }

  assert {
    condition     = strcontains(module.gateway.user_data, "--initial-budget-json '{\"cluster_watts\":2800}'")
    error_message = "The gateway gets the initial power budget."
  }

  assert {
    condition     = strcontains(module.gateway.user_data, "EMBER_NODE_POWER_W=300") && floor(var.initial_power_budget_w / var.node_power_w) >= var.worker_max_size
    error_message = "By default one node's watts fit the default worker (g5.xlarge: one 300 W A10G), and the default budget lets the node scaler reach worker_max_size."
  }

  assert {
    condition     = !strcontains(module.workers.user_data, output.secret_arns["admin-key"]) && strcontains(module.gateway.user_data, output.secret_arns["admin-key"])
    error_message = "Only gateways read the admin key."
  }

  assert {
    condition     = strcontains(module.workers.user_data, "AWS_REGION='us-east-1'")
    error_message = "Workers get the region for S3."
  }
}

run "accepts_given_redis_token_and_observe_mode" {
  command = apply

  variables {
    redis_auth_token = "GivenToken0123456789abcdef"
    energy_mode      = "observe"
  }

  assert {
    condition     = strcontains(module.workers.user_data, "--energy-mode observe")
    error_message = "energy_mode reaches the workers."
  }
}

run "given_secrets_rotate_by_secret_version" {
  command = plan

  # Write-only values are invisible to terraform: only a new secret_version writes new ones.
  variables {
    cluster_token  = "given-cluster-token-0123456789abcdef"
    admin_key      = "given-admin-key-0123456789abcdef"
    secret_version = 2
  }

  assert {
    condition     = module.secrets.written_versions == { "admin-key" = 2, "cluster-token" = 2 }
    error_message = "secret_version reaches the secrets module: raising it rotates the given cluster token and admin key."
  }
}

run "rejects_secret_version_zero" {
  command = plan

  variables {
    secret_version = 0
  }

  expect_failures = [var.secret_version]
}

run "plain_http_only_when_waived" {
  command = plan

  variables {
    certificate_arn  = null
    allow_plain_http = true
  }

  assert {
    condition     = startswith(output.gateway_url, "http://")
    error_message = "Waived: plain HTTP on 80."
  }
}

run "refuses_plain_http_by_default" {
  command = plan

  variables {
    certificate_arn = null
  }

  expect_failures = [var.certificate_arn]
}

run "refuses_v100_workers" {
  command = plan

  variables {
    worker_instance_type = "p3.2xlarge"
  }

  expect_failures = [var.worker_instance_type]
}

run "refuses_a_vpc_whose_public_subnets_cannot_hold_an_alb" {
  command = plan

  variables {
    vpc_cidr = "10.42.0.0/20"
  }

  expect_failures = [var.vpc_cidr]
}

run "extra_env_reaches_both_and_refuses_secrets" {
  command = plan

  variables {
    extra_env = { EMBER_SLO_TIMEOUT_S = "60" }
  }

  assert {
    condition     = strcontains(module.workers.user_data, "EMBER_SLO_TIMEOUT_S=\"60\"") && strcontains(module.gateway.user_data, "EMBER_SLO_TIMEOUT_S=\"60\"")
    error_message = "extra_env reaches gateways and workers."
  }
}

run "extra_env_refuses_secrets_and_bad_names" {
  command = plan

  variables {
    extra_env = { EMBER_ADMIN_KEY = "x", "not-ember" = "y", EMBER_OK = "with \"quote" }
  }

  expect_failures = [var.extra_env]
}

run "rejects_unknown_energy_mode" {
  command = plan

  variables {
    energy_mode = "turbo"
  }

  expect_failures = [var.energy_mode]
}

run "rejects_cpu_worker_instance_type" {
  command = plan

  variables {
    worker_instance_type = "m7i.large"
  }

  expect_failures = [var.worker_instance_type]
}

run "rejects_gpu_gateway_instance_type" {
  command = plan

  variables {
    gateway_instance_type = "g5.xlarge"
  }

  expect_failures = [var.gateway_instance_type]
}

run "rejects_bad_cidrs" {
  command = plan

  variables {
    vpc_cidr              = "10.42.0.0/24"
    allowed_ingress_cidrs = ["not-a-cidr"]
  }

  expect_failures = [var.vpc_cidr, var.allowed_ingress_cidrs]
}

run "rejects_short_idle_timeout" {
  command = plan

  variables {
    alb_idle_timeout_s = 60
  }

  expect_failures = [var.alb_idle_timeout_s]
}

run "rejects_desired_above_max" {
  command = plan

  variables {
    worker_desired_capacity = 5
    worker_max_size         = 4
  }

  expect_failures = [var.worker_desired_capacity]
}

run "rejects_s3_package_that_is_not_a_wheel" {
  command = plan

  variables {
    ember_package = "s3://ember-ckpt/packages/ember.tar.gz"
  }

  expect_failures = [var.ember_package]
}

run "rejects_quote_in_package" {
  command = plan

  variables {
    ember_package = "ember'; rm -rf /"
  }

  expect_failures = [var.ember_package]
}

run "rejects_bad_budget_and_redis_token" {
  command = plan

  variables {
    initial_power_budget_w = 0
    redis_auth_token       = "short"
  }

  expect_failures = [var.initial_power_budget_w, var.redis_auth_token]
}

run "rejects_a_budget_below_one_node" {
  command = plan

  variables {
    worker_instance_type   = "p5.48xlarge"
    node_power_w           = 5600
    initial_power_budget_w = 2800
  }

  expect_failures = [var.initial_power_budget_w]
}

run "rejects_redis_6" {
  command = plan

  variables {
    redis_engine_version = "6.2"
  }

  expect_failures = [var.redis_engine_version]
}
