# A minimal deployment of Ember: one gateway behind an HTTPS load balancer, one GPU worker (more
# when the gateways' node scaler asks), Redis and the checkpoint bucket, with generated secrets.
#
#   terraform init && terraform apply -var 'ember_package=s3://my-bucket/ember-0.1.0-py3-none-any.whl' \
#     -var certificate_arn=arn:aws:acm:... -var gateway_ami_id=ami-... -var worker_ami_id=ami-...

terraform {
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.100, < 6.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region to deploy in."
  type        = string
  default     = "us-east-1"
}

variable "ember_package" {
  description = "What pip installs on gateways and workers: a requirement or an s3:// wheel URL."
  type        = string
}

variable "certificate_arn" {
  description = "ACM certificate for the API's HTTPS listener."
  type        = string
}

variable "gateway_ami_id" {
  description = "Canonical Ubuntu 22.04 AMI (see terraform/README.md for the lookup)."
  type        = string
}

variable "worker_ami_id" {
  description = "Deep Learning Base OSS Nvidia Driver GPU AMI, Ubuntu 22.04 (see terraform/README.md)."
  type        = string
}

variable "allowed_ingress_cidrs" {
  description = "Who may reach the API."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

module "ember" {
  source = "../.."

  name                     = "ember-demo"
  ember_package            = var.ember_package
  certificate_arn          = var.certificate_arn
  gateway_ami_id           = var.gateway_ami_id
  worker_ami_id            = var.worker_ami_id
  allowed_ingress_cidrs    = var.allowed_ingress_cidrs
  gateway_min_size         = 1
  gateway_desired_capacity = 1
  worker_instance_type     = "g5.xlarge"
  worker_desired_capacity  = 1
  worker_max_size          = 4
  energy_mode              = "recommend"
  initial_power_budget_w   = 300
  redis_num_cache_clusters = 1
}

output "gateway_url" {
  description = "Base URL of the Ember API."
  value       = module.ember.gateway_url
}

output "checkpoint_store_url" {
  description = "Upload checkpoints here (assume the uploader role)."
  value       = module.ember.checkpoint_store_url
}

output "uploader_role_arn" {
  description = "Role to assume for uploads."
  value       = module.ember.uploader_role_arn
}

output "admin_key_secret_arn" {
  description = "Read the admin key: aws secretsmanager get-secret-value --secret-id <this>."
  value       = module.ember.secret_arns["admin-key"]
}
