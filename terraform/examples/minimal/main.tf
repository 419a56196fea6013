# A minimal deployment of Ember: one gateway behind a plain-HTTP load balancer, one GPU
# worker, Redis and the checkpoint bucket, with generated secrets.
#
#   terraform init && terraform apply -var 'ember_package=s3://my-bucket/ember-0.1.0-py3-none-any.whl'

terraform {
  required_version = ">= 1.9"

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

variable "allowed_ingress_cidrs" {
  description = "Who may reach the API."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

module "ember" {
  source = "../.."

  name                     = "ember-demo"
  ember_package            = var.ember_package
  allowed_ingress_cidrs    = var.allowed_ingress_cidrs
  gateway_min_size         = 1
  gateway_desired_capacity = 1
  worker_instance_type     = "g5.xlarge"
  worker_desired_capacity  = 1
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
