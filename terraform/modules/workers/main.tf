# GPU workers: a launch template (IMDSv2 only, no public address, instance-store NVMe as
# the SSD tier) and an Auto Scaling group that may scale to zero. Only the gateways can
# reach a worker's port.

locals {
  port     = 8081
  data_dir = "/mnt/ember"
  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
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
  })
}

data "aws_ssm_parameter" "dlami" {
  count = var.ami_id == null ? 1 : 0
  name  = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
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
  image_id               = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.dlami[0].value)
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
  name_prefix         = "${var.name}-worker-"
  vpc_zone_identifier = var.subnet_ids
  min_size            = 0
  max_size            = var.max_size
  desired_capacity    = var.desired_capacity
  # Installing Ember and its CUDA wheels takes minutes on first boot.
  health_check_grace_period = 900
  health_check_type         = "EC2"

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  dynamic "tag" {
    for_each = merge(var.tags, { "ember:role" = "worker" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = false
    }
  }
}
