# GPU workers: IMDSv2 only, no public address, reachable only from the gateways, an Auto
# Scaling group that may scale to zero (its size owned by Ember's node scaler), ELB health,
# a stopped warm pool, a drain hook, a pinned AMI, and user data that starts `ember worker`
# right: no secret on its command line, the DLAMI's instance-store volume reused.

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
  ami_id                      = "ami-0123456789abcdef0"
  extra_env                   = { EMBER_CPU_SLOTS = "4" }
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
    condition     = strcontains(output.user_data, "rediss://:{token}@master.ember-redis.abc123.use1.cache.amazonaws.com:6379/0")
    error_message = "Workers must connect to Redis over TLS with the AUTH token."
  }

  assert {
    condition = (
      !strcontains(output.user_data, "--redis-url") &&
      strcontains(output.user_data, "ExecStartPre=+/usr/local/sbin/ember-worker-secrets") &&
      strcontains(output.user_data, "chmod 0600 /run/ember/worker.env.tmp") &&
      strcontains(output.user_data, "chown \"$owner:$owner\" /run/ember/worker.env.tmp") &&
      strcontains(output.user_data, "owner='ember'")
    )
    error_message = "Secrets go to an env file only the service user reads, never onto the worker's command line."
  }

  assert {
    condition     = !strcontains(output.user_data, "Requires=ember-ssd.service") && !strcontains(output.user_data, "Requires=ember-disk.service") && strcontains(output.user_data, "Wants=network-online.target ember-disk.service")
    error_message = "The worker must not require the disk step: a failed disk step leaves the SSD tier on the root volume, not a dead worker."
  }

  assert {
    condition     = strcontains(output.user_data, "/opt/dlami/nvme") && !strcontains(output.user_data, "mkfs.xfs -f") && !strcontains(output.user_data, "--force")
    error_message = "The DLAMI's instance-store volume is reused; nothing force-formats disks."
  }

  assert {
    condition     = strcontains(output.user_data, "size=$tmpfs_bytes")
    error_message = "The DRAM tier's tmpfs has an explicit size."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_CPU_SLOTS=\"4\"")
    error_message = "extra_env reaches the worker."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_METRICS_REQUIRE_KEY=true") && strcontains(output.user_data, "EnvironmentFile=/etc/ember/extra.env")
    error_message = "A worker's /metrics needs the cluster token (x-ember-cluster-token), as the gateway's needs a key."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_CLOUD_INSTANCE_ID=$(imds instance-id)")
    error_message = "Workers record their cloud instance id."
  }

  assert {
    condition     = aws_launch_template.this.image_id == "ami-0123456789abcdef0" && output.ami_id == "ami-0123456789abcdef0"
    error_message = "The AMI is the pinned one, not SSM's latest read at plan time."
  }

  assert {
    condition = (
      one(one(aws_autoscaling_group.this.instance_refresh).preferences).min_healthy_percentage == 100 &&
      aws_autoscaling_group.this.health_check_type == "ELB" &&
      aws_autoscaling_group.this.target_group_arns == toset([aws_lb_target_group.health.arn]) &&
      one(aws_lb_target_group.health.health_check).path == "/healthz"
    )
    error_message = "Workers: ELB health (a dead worker process is replaced) and refreshes that never drop below full strength."
  }

  assert {
    condition     = one(aws_autoscaling_group.this.warm_pool).pool_state == "Stopped" && one(aws_autoscaling_group.this.warm_pool).min_size == 1
    error_message = "A stopped warm pool for fast node start."
  }

  assert {
    condition = [
      for h in aws_autoscaling_group.this.initial_lifecycle_hook : h.name if h.lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
    ] == ["ember-drain"]
    error_message = "A terminating lifecycle hook lets Ember drain a node first."
  }

  # AWS stops an instance launched into the (stopped) warm pool without waiting for its user data
  # unless a launching hook holds it; the node completes the hook itself once it is set up.
  assert {
    condition = [
      for h in aws_autoscaling_group.this.initial_lifecycle_hook : [h.name, h.default_result, h.heartbeat_timeout]
      if h.lifecycle_transition == "autoscaling:EC2_INSTANCE_LAUNCHING"
    ] == [["ember-launch", "CONTINUE", 1800]]
    error_message = "A launching hook (ember-launch, CONTINUE when it times out) holds a new worker until its setup is done."
  }

  assert {
    condition = (
      aws_autoscaling_group.this.name == "ember-worker" &&
      strcontains(output.user_data, "group='ember-worker'") &&
      strcontains(output.user_data, "LifecycleHookName=\"ember-launch\"") &&
      strcontains(output.user_data, "After=network-online.target ember-disk.service ember-worker.service") &&
      strcontains(output.user_data, "ExecStart=/usr/local/sbin/ember-launch-complete") &&
      strcontains(output.user_data, "systemctl enable --now ember-disk.service ember-worker.service ember-launch-complete.service")
    )
    error_message = "At every boot (the hook fires again when an instance leaves the warm pool, when user data does not run), a unit ordered after the worker completes the launch for the node's own group."
  }

  assert {
    condition     = aws_autoscaling_group.this.protect_from_scale_in
    error_message = "Ember, not the group, picks which worker goes."
  }

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.from_health.referenced_security_group_id) > 0 && aws_lb.health.internal
    error_message = "The health-check balancer is internal."
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
    error_message = "Without the DLAMI's volume, blank instance-store NVMe disks become the SSD tier."
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

run "node_scaler_owns_the_desired_capacity" {
  command = apply

  module {
    source = "./modules/workers"
  }

  # The same state as "workers_are_locked_down": the node scaler has set the group's size since.
  variables {
    desired_capacity = 3
  }

  assert {
    condition     = aws_autoscaling_group.this.desired_capacity == 1
    error_message = "terraform must not fight the node scaler: desired_capacity is ignored after creation."
  }
}

run "launch_timeout_is_a_variable" {
  command = plan

  module {
    source = "./modules/workers"
  }

  variables {
    launch_timeout_s = 3600
  }

  assert {
    condition = [
      for h in aws_autoscaling_group.this.initial_lifecycle_hook : h.heartbeat_timeout if h.name == "ember-launch"
    ] == [3600]
    error_message = "launch_timeout_s sets how long a new worker may take to set itself up."
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
    condition     = strcontains(output.user_data, "--energy-mode actuate") && strcontains(output.user_data, "User=root") && strcontains(output.user_data, "owner='root'")
    error_message = "Setting GPU power limits needs root (and the env file is then root's)."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_PACKAGE='s3://ember-ckpt/packages/ember-0.1.0-py3-none-any.whl'")
    error_message = "A wheel in S3 is passed through to the installer."
  }
}
