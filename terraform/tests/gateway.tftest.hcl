# Gateways: a public ALB with a long idle timeout for SSE streams and a /healthz health check
# (not /readyz: a Redis failover would fail every gateway at once); the gateway instances are
# reachable only from the ALB; no secret on a command line; /metrics behind a key; the node
# scaler pointed at the worker group.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name                          = "ember"
  vpc_id                        = "vpc-0123456789abcdef0"
  public_subnet_ids             = ["subnet-public-a", "subnet-public-b"]
  private_subnet_ids            = ["subnet-private-a", "subnet-private-b"]
  allowed_ingress_cidrs         = ["0.0.0.0/0"]
  idle_timeout_s                = 900
  instance_type                 = "c7i.large"
  min_size                      = 1
  max_size                      = 4
  desired_capacity              = 2
  instance_profile_name         = "ember-gateway"
  ember_package                 = "ember==0.1.0"
  region                        = "us-east-1"
  redis_host                    = "master.ember-redis.abc123.use1.cache.amazonaws.com"
  redis_port                    = 6379
  redis_auth_token_secret_arn   = "arn:aws:secretsmanager:us-east-1:123456789012:secret:redis"
  cluster_token_secret_arn      = "arn:aws:secretsmanager:us-east-1:123456789012:secret:cluster"
  admin_key_secret_arn          = "arn:aws:secretsmanager:us-east-1:123456789012:secret:admin"
  initial_power_budget_w        = 5600
  ami_id                        = "ami-0123456789abcdef0"
  worker_autoscaling_group_name = "ember-worker-abc"
  worker_max_size               = 8
  extra_env                     = { EMBER_SLO_TIMEOUT_S = "60" }
}

run "alb_serves_streams_and_checks_readiness" {
  command = apply

  module {
    source = "./modules/gateway"
  }

  assert {
    condition     = aws_lb.this.idle_timeout >= 300
    error_message = "The ALB idle timeout must be at least 300 s so SSE streams survive pauses."
  }

  assert {
    condition     = !aws_lb.this.internal && aws_lb.this.load_balancer_type == "application" && aws_lb.this.drop_invalid_header_fields
    error_message = "A public application load balancer that drops invalid headers."
  }

  assert {
    condition     = one(aws_lb_target_group.this.health_check).path == "/healthz" && aws_lb_target_group.this.port == 8000
    error_message = "Health checks go to /healthz on the gateway port (/readyz fails on a Redis failover and would replace every gateway)."
  }

  assert {
    condition     = aws_autoscaling_group.this.target_group_arns == toset([aws_lb_target_group.this.arn]) && aws_autoscaling_group.this.health_check_type == "ELB"
    error_message = "The gateway group registers with the target group and uses its health."
  }

  assert {
    condition     = toset(aws_autoscaling_group.this.vpc_zone_identifier) == toset(var.private_subnet_ids)
    error_message = "Gateway instances run in private subnets."
  }

  assert {
    condition     = one(aws_launch_template.this.metadata_options).http_tokens == "required" && one(aws_launch_template.this.network_interfaces).associate_public_ip_address == "false"
    error_message = "Gateways require IMDSv2 and have no public address."
  }

  assert {
    condition = (
      aws_vpc_security_group_ingress_rule.gateway_from_alb.security_group_id == aws_security_group.gateway.id &&
      aws_vpc_security_group_ingress_rule.gateway_from_alb.referenced_security_group_id == aws_security_group.alb.id &&
      aws_vpc_security_group_ingress_rule.gateway_from_alb.cidr_ipv4 == null
    )
    error_message = "Only the load balancer may reach a gateway."
  }

  assert {
    condition     = toset([for r in aws_vpc_security_group_ingress_rule.alb : r.from_port]) == toset([80]) && length(aws_lb_listener.https) == 0
    error_message = "Without a certificate the ALB listens on HTTP 80 only."
  }

  assert {
    condition     = startswith(output.url, "http://")
    error_message = "Without a certificate the URL is plain HTTP."
  }

  assert {
    condition     = strcontains(output.user_data, "ember\" gateway \\") && strcontains(output.user_data, "--initial-budget-json '{\"cluster_watts\":5600}'")
    error_message = "User data must start `ember gateway` with the initial power budget."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_ENV=production") && strcontains(output.user_data, "EMBER_ADMIN_KEY")
    error_message = "The gateway runs in production mode with its admin key."
  }

  assert {
    condition = (
      !strcontains(output.user_data, "--redis-url") &&
      strcontains(output.user_data, "ExecStartPre=+/usr/local/sbin/ember-gateway-secrets") &&
      strcontains(output.user_data, "chmod 0600 /run/ember/gateway.env.tmp") &&
      strcontains(output.user_data, "chown ember:ember /run/ember/gateway.env.tmp")
    )
    error_message = "Secrets go to an env file only the service user reads, never onto the command line."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_METRICS_REQUIRE_KEY=true")
    error_message = "/metrics needs a key."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_SLO_TIMEOUT_S=\"60\"")
    error_message = "extra_env reaches the gateway."
  }

  assert {
    condition     = strcontains(output.user_data, "EMBER_NODE_BACKEND=aws") && strcontains(output.user_data, "EMBER_AWS_AUTOSCALING_GROUP=ember-worker-abc") && strcontains(output.user_data, "EMBER_NODE_MAX=8") && strcontains(output.user_data, "EMBER_NODE_MIN=1")
    error_message = "The gateways' node scaler sizes the worker group."
  }

  assert {
    condition     = aws_launch_template.this.image_id == "ami-0123456789abcdef0" && output.ami_id == "ami-0123456789abcdef0"
    error_message = "The AMI is the pinned one, not SSM's latest read at plan time."
  }

  assert {
    condition     = one(one(aws_autoscaling_group.this.instance_refresh).preferences).min_healthy_percentage == 100
    error_message = "An instance refresh keeps every gateway serving (min_healthy_percentage 100)."
  }
}

run "certificate_turns_on_https" {
  command = apply

  module {
    source = "./modules/gateway"
  }

  variables {
    certificate_arn       = "arn:aws:acm:us-east-1:123456789012:certificate/abc"
    allowed_ingress_cidrs = ["203.0.113.0/24"]
  }

  assert {
    condition     = length(aws_lb_listener.https) == 1 && one(aws_lb_listener.http.default_action).type == "redirect"
    error_message = "With a certificate the ALB serves HTTPS and redirects HTTP."
  }

  assert {
    condition     = toset([for r in aws_vpc_security_group_ingress_rule.alb : "${r.from_port}:${r.cidr_ipv4}"]) == toset(["80:203.0.113.0/24", "443:203.0.113.0/24"])
    error_message = "The ALB accepts only the allowed CIDRs."
  }

  assert {
    condition     = startswith(output.url, "https://")
    error_message = "With a certificate the URL is HTTPS."
  }
}
