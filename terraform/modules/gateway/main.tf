# Gateways: a public Application Load Balancer in front of an Auto Scaling group of CPU
# instances in private subnets running `ember gateway`. Only the load balancer reaches a
# gateway; the idle timeout is long so quiet SSE token streams are not cut.

locals {
  port  = 8000
  https = var.certificate_arn != null
  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    ember_package               = var.ember_package
    torch_index_url             = var.torch_index_url
    region                      = var.region
    redis_host                  = var.redis_host
    redis_port                  = var.redis_port
    redis_auth_token_secret_arn = var.redis_auth_token_secret_arn
    cluster_token_secret_arn    = var.cluster_token_secret_arn
    admin_key_secret_arn        = var.admin_key_secret_arn
    port                        = local.port
    initial_power_budget_w      = var.initial_power_budget_w
    worker_autoscaling_group    = var.worker_autoscaling_group_name
    worker_max_size             = var.worker_max_size
    worker_min_nodes            = var.worker_min_nodes
    node_power_w                = var.node_power_w
    node_boot_s                 = var.node_boot_s
    metrics_namespace           = var.metrics_namespace
    extra_env                   = var.extra_env
  })
  listener_ports = local.https ? [80, 443] : [80]
}

# --- security groups ---------------------------------------------------------------------

resource "aws_security_group" "alb" {
  name_prefix = "${var.name}-alb-"
  description = "Ember load balancer"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-alb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "alb" {
  for_each = {
    for pair in setproduct(local.listener_ports, var.allowed_ingress_cidrs) : "${pair[0]}-${pair[1]}" => {
      port = pair[0]
      cidr = pair[1]
    }
  }
  security_group_id = aws_security_group.alb.id
  description       = "Clients"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "alb_to_gateway" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To the gateways"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.gateway.id
}

resource "aws_security_group" "gateway" {
  name_prefix = "${var.name}-gateway-"
  description = "Ember gateways: reachable only from the load balancer"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-gateway" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "gateway_from_alb" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "Ember gateway from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.alb.id
}

# Outbound: workers, Redis, Secrets Manager and PyPI (NAT gateway).
resource "aws_vpc_security_group_egress_rule" "gateway_all" {
  security_group_id = aws_security_group.gateway.id
  description       = "All outbound"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

# --- load balancer -----------------------------------------------------------------------

resource "aws_lb" "this" {
  name_prefix                = "ember-"
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.public_subnet_ids
  security_groups            = [aws_security_group.alb.id]
  idle_timeout               = var.idle_timeout_s
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  tags                       = merge(var.tags, { Name = var.name })
}

resource "aws_lb_target_group" "this" {
  name_prefix = "ember-"
  port        = local.port
  protocol    = "HTTP"
  target_type = "instance"
  vpc_id      = var.vpc_id
  # Let in-flight streams finish when a gateway is replaced.
  deregistration_delay = min(var.idle_timeout_s, 3600)
  tags                 = var.tags

  # /healthz, not /readyz: /readyz fails on any Redis error, and a Redis failover longer than
  # the unhealthy threshold would then replace every gateway at once.
  health_check {
    path                = "/healthz"
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = local.https ? "redirect" : "forward"
    target_group_arn = local.https ? null : aws_lb_target_group.this.arn

    dynamic "redirect" {
      for_each = local.https ? [1] : []
      content {
        port        = "443"
        protocol    = "HTTPS"
        status_code = "HTTP_301"
      }
    }
  }
}

resource "aws_lb_listener" "https" {
  count             = local.https ? 1 : 0
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
}

# --- instances ---------------------------------------------------------------------------

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-gateway-"
  description            = "Ember gateway"
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
    security_groups             = [aws_security_group.gateway.id]
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
      volume_size           = 30
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-gateway", "ember:role" = "gateway" })
  }

  tags = var.tags
}

resource "aws_autoscaling_group" "this" {
  name_prefix               = "${var.name}-gateway-"
  vpc_zone_identifier       = var.private_subnet_ids
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  target_group_arns         = [aws_lb_target_group.this.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 600

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 100
      max_healthy_percentage = 200
    }
  }

  dynamic "tag" {
    for_each = merge(var.tags, { "ember:role" = "gateway" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = false
    }
  }
}
