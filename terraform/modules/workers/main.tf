# GPU workers: a launch template (IMDSv2 only, no public address, the DLAMI's instance-store
# volume as the SSD tier) and an Auto Scaling group that may scale to zero and that Ember's node
# scaler sizes (terraform ignores its desired capacity after creation). Only the gateways (and
# the internal health-check balancer) can reach a worker's port.

locals {
  port     = 8081
  data_dir = "/mnt/ember"
  # A fixed name, not a prefix: a worker completes its own launch hook in this group, so its user
  # data (in the launch template the group is made from) must name the group in advance.
  group_name = "${var.name}-worker"
  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    group_name                  = local.group_name
    ember_package               = var.ember_package
    region                      = var.region
    redis_host                  = var.redis_host
    redis_port                  = var.redis_port
    redis_auth_token_secret_arn = var.redis_auth_token_secret_arn
    cluster_token_secret_arn    = var.cluster_token_secret_arn
    store_url                   = var.store_url
    data_dir                    = local.data_dir
    port                        = local.port
    energy_mode                 = var.energy_mode
    service_user                = var.energy_mode == "actuate" ? "root" : "ember"
    dram_percent                = var.dram_percent
    extra_env                   = var.extra_env
  })
  group_tags = merge(var.tags, { "ember:role" = "worker", "ember:deployment" = var.name })
}

resource "aws_security_group" "this" {
  name_prefix = "${var.name}-worker-"
  description = "Ember GPU workers: reachable only from Ember gateways"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-worker" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "from_gateway" {
  security_group_id            = aws_security_group.this.id
  description                  = "Ember worker API from the gateways"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = var.gateway_security_group_id
}

# Outbound: Redis, S3 (VPC endpoint), Secrets Manager and PyPI (NAT gateway).
resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.this.id
  description       = "All outbound"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-worker-"
  description            = "Ember GPU worker"
  image_id               = var.ami_id # pinned: a new AMI is a deliberate change, rolled out by instance refresh
  instance_type          = var.instance_type
  update_default_version = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    name = var.instance_profile_name
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.this.id]
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_size           = var.root_volume_size_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-worker", "ember:role" = "worker" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.name}-worker" })
  }

  tags = var.tags
}

resource "aws_autoscaling_group" "this" {
  name                = local.group_name
  vpc_zone_identifier = var.subnet_ids
  min_size            = 0
  max_size            = var.max_size
  desired_capacity    = var.desired_capacity
  # Installing Ember and its CUDA wheels takes minutes on first boot.
  health_check_grace_period = 900
  # A new worker is InService only once set up (the ember-launch hook, up to launch_timeout_s) and
  # the node scaler owns the size: apply does not wait for it (a timeout would taint the group).
  wait_for_capacity_timeout = "0"
  # A worker whose process is down fails the balancer's check and is replaced, not only a dead VM.
  health_check_type = "ELB"
  target_group_arns = [aws_lb_target_group.health.arn]
  # Ember chooses which node goes (after draining it); the group never picks one itself.
  protect_from_scale_in = true

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      # A new AMI or template replaces workers one at a time, launching first: never fewer.
      min_healthy_percentage       = 100
      max_healthy_percentage       = 200
      scale_in_protected_instances = "Refresh"
    }
  }

  # Stopped, pre-initialised instances (Ember installed, drivers loaded): a scale-out starts one
  # in about a minute instead of installing from scratch.
  dynamic "warm_pool" {
    for_each = var.warm_pool_size > 0 ? [1] : []
    content {
      pool_state                  = "Stopped"
      min_size                    = var.warm_pool_size
      max_group_prepared_capacity = var.warm_pool_size
      instance_reuse_policy {
        reuse_on_scale_in = false
      }
    }
  }

  # AWS stops an instance launched into the warm pool without waiting for its user data unless a
  # launching hook holds it. The node completes this hook itself once set up
  # (ember-launch-complete.service, at every boot: the hook fires again when an instance leaves the
  # warm pool, when user data does not run). CONTINUE on timeout: a failed completion delays a
  # node, it never kills the fleet.
  initial_lifecycle_hook {
    name                 = "ember-launch"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = var.launch_timeout_s
  }

  # Something else terminating a worker (a refresh, an operator, a zone rebalance) waits here
  # until Ember has drained it and completes the action (ember.platform.cloud.LIFECYCLE_HOOK).
  initial_lifecycle_hook {
    name                 = "ember-drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = var.drain_timeout_s
  }

  dynamic "tag" {
    for_each = local.group_tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = false
    }
  }

  lifecycle {
    # Ember's node scaler owns the size from now on.
    ignore_changes = [desired_capacity]
  }
}

# --- health: an internal balancer nobody can reach, whose checks the group uses ----------

resource "aws_security_group" "health" {
  name_prefix = "${var.name}-worker-health-"
  description = "Ember worker health checks (no ingress)"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-worker-health" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "health_to_workers" {
  security_group_id            = aws_security_group.health.id
  description                  = "Health checks to the workers"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.this.id
}

resource "aws_vpc_security_group_ingress_rule" "from_health" {
  security_group_id            = aws_security_group.this.id
  description                  = "Health checks from the internal balancer"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.health.id
}

resource "aws_lb" "health" {
  name_prefix                = "ewh-"
  load_balancer_type         = "application"
  internal                   = true
  subnets                    = var.subnet_ids
  security_groups            = [aws_security_group.health.id]
  drop_invalid_header_fields = true
  tags                       = merge(var.tags, { Name = "${var.name}-worker-health" })
}

resource "aws_lb_target_group" "health" {
  name_prefix = "ewh-"
  port        = local.port
  protocol    = "HTTP"
  target_type = "instance"
  vpc_id      = var.vpc_id
  tags        = var.tags

  health_check {
    path                = "/healthz"
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 4
  }

  lifecycle {
    create_before_destroy = true
  }
}

# Health checks run only for a target group behind a listener; its security group admits no one.
resource "aws_lb_listener" "health" {
  load_balancer_arn = aws_lb.health.arn
  port              = local.port
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.health.arn
  }
}
