# Values the mocked aws provider returns where its random strings would fail the provider's
# own validation (ARNs, launch template ids, password rules) or make assertions vague.

mock_data "aws_availability_zones" {
  defaults = {
    names = ["us-east-1a", "us-east-1b", "us-east-1c"]
  }
}

mock_data "aws_region" {
  defaults = {
    name = "us-east-1"
  }
}

mock_data "aws_partition" {
  defaults = {
    partition = "aws"
  }
}

mock_data "aws_caller_identity" {
  defaults = {
    account_id = "123456789012"
  }
}

mock_data "aws_secretsmanager_random_password" {
  defaults = {
    random_password = "MockGeneratedPassword0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH"
  }
}

mock_data "aws_ssm_parameter" {
  defaults = {
    value = "ami-0123456789abcdef0"
  }
}

mock_resource "aws_s3_bucket" {
  defaults = {
    id  = "ember-checkpoints-mock"
    arn = "arn:aws:s3:::ember-checkpoints-mock"
  }
}

mock_resource "aws_launch_template" {
  defaults = {
    id             = "lt-0123456789abcdef0"
    latest_version = 1
  }
}

mock_resource "aws_lb" {
  defaults = {
    arn      = "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/ember/0123456789abcdef"
    dns_name = "ember-0123456789.us-east-1.elb.amazonaws.com"
  }
}

mock_resource "aws_lb_target_group" {
  defaults = {
    arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/ember/0123456789abcdef"
  }
}

mock_resource "aws_elasticache_replication_group" {
  defaults = {
    primary_endpoint_address = "master.ember-redis.mock.use1.cache.amazonaws.com"
  }
}

mock_resource "aws_iam_role" {
  defaults = {
    arn = "arn:aws:iam::123456789012:role/ember-mock"
  }
}

mock_resource "aws_autoscaling_group" {
  defaults = {
    arn = "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:0123:autoScalingGroupName/ember-worker-mock"
  }
}
