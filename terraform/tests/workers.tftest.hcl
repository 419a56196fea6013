# GPU workers: IMDSv2 only, no public address, reachable only from the gateways, an Auto
# Scaling group that may scale to zero, and user data that starts `ember worker` right.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name                        = "ember"
  vpc_id                      = "vpc-0123456789abcdef0"
  subnet_ids                  = ["subnet-private-a", "subnet-private-b"]
  gateway_security_group_id   = "sg-gateway"
  instance_type               = "g5.xlarge"
  desired_capacity            = 1
  max_size                    = 4
  root_volume_size_gb         = 200
  instance_profile_name       = "ember-worker"
  ember_package               = "ember==0.1.0"
  energy_mode                 = "recommend"
  region                      = "us-east-1"
  redis_host                  = "master.ember-redis.abc123.use1.cache.amazonaws.com"
  redis_port                  = 6379
  redis_auth_token_secret_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:redis"
  cluster_token_secret_arn    = "arn:aws:secretsmanager:us-east-1:123456789012:secret:cluster"
  store_url                   = "s3://ember-ckpt/checkpoints"
}

run "workers_are_locked_down" {
  command = apply

  module {
    source = "./modules/workers"
  }

  assert {
    condition     = one(aws_launch_template.this.metadata_options).http_tokens == "required"
    error_message = "Workers must require IMDSv2."
  }

  assert {
    condition     = one(aws_launch_template.this.network_interfaces).associate_public_ip_address == "false"
    error_message = "Workers must have no public address."
  }

  assert {
    condition     = one(aws_launch_template.this.network_interfaces).security_groups == toset([aws_security_group.this.id])
    error_message = "Workers must use only the worker security group."
  }

  assert {
    condition = (
      aws_vpc_security_group_ingress_rule.from_gateway.security_group_id == aws_security_group.this.id &&
      aws_vpc_security_group_ingress_rule.from_gateway.referenced_security_group_id == "sg-gateway" &&
      aws_vpc_security_group_ingress_rule.from_gateway.cidr_ipv4 == null &&
      aws_vpc_security_group_ingress_rule.from_gateway.cidr_ipv6 == null &&
      aws_vpc_security_group_ingress_rule.from_gateway.from_port == 8081 &&
      aws_vpc_security_group_ingress_rule.from_gateway.to_port == 8081
    )
    error_message = "Only the gateways may reach a worker, and only on its API port."
  }

  assert {
    condition     = toset(aws_autoscaling_group.this.vpc_zone_identifier) == toset(var.subnet_ids)
    error_message = "Workers run in the private subnets."
  }

  assert {
    condition     = aws_autoscaling_group.this.min_size == 0 && aws_autoscaling_group.this.desired_capacity == 1 && aws_autoscaling_group.this.max_size == 4
    error_message = "The worker group scales from 0, to the desired capacity given."
  }

  assert {
    condition     = alltrue([for b in aws_launch_template.this.block_device_mappings : one(b.ebs).encrypted == "true"])
    error_message = "Worker volumes must be encrypted."
  }

  assert {
    condition     = base64decode(aws_launch_template.this.user_data) == output.user_data
    error_message = "The launch template must carry the rendered user data."
  }

  assert {
    condition     = strcontains(output.user_data, "ember\" worker \\") && strcontains(output.user_data, "--energy-mode recommend")
    error_message = "User data must start `ember worker` in the chosen energy mode."
  }

  assert {
    condition     = strcontains(output.user_data, "--redis-url \"rediss://:$redis_token@master.ember-redis.abc123.use1.cache.amazonaws.com:6379/0\"")
    error_message = "Workers must connect to Redis over TLS with the AUTH token."
  }

  assert {
    condition     = strcontains(output.user_data, "--store-url 's3://ember-ckpt/checkpoints'") && strcontains(output.user_data, "--data-dir '/mnt/ember'")
    error_message = "Workers must read the bucket's checkpoint prefix and keep the SSD tier on the instance store mount."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_SSD_CAPACITY_BYTES") && strcontains(output.user_data, "EMBER_DRAM_CAPACITY_BYTES")
    error_message = "The worker's tiers are sized to the machine."
  }

  assert {
    condition     = strcontains(output.user_data, "Amazon EC2 NVMe Instance Storage")
    error_message = "User data must mount the instance-store NVMe as the SSD tier."
  }

  assert {
    condition     = strcontains(output.user_data, "pip\" install -q \"$EMBER_PACKAGE\"") && strcontains(output.user_data, "EMBER_PACKAGE='ember==0.1.0'")
    error_message = "User data must install Ember from ember_package."
  }

  assert {
    condition     = strcontains(output.user_data, "User=ember") && !strcontains(output.user_data, "User=root")
    error_message = "Outside actuate mode the worker runs unprivileged."
  }
}

run "actuate_mode_runs_as_root" {
  command = plan

  module {
    source = "./modules/workers"
  }

  variables {
    energy_mode   = "actuate"
    ember_package = "s3://ember-ckpt/packages/ember-0.1.0-py3-none-any.whl"
  }

  assert {
    condition     = strcontains(output.user_data, "--energy-mode actuate") && strcontains(output.user_data, "User=root")
    error_message = "Setting GPU power limits needs root."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_PACKAGE='s3://ember-ckpt/packages/ember-0.1.0-py3-none-any.whl'")
    error_message = "A wheel in S3 is passed through to the installer."
  }
}
