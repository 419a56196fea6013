# Ember on AWS: gateways behind a load balancer and GPU workers on many nodes, sharing one
# ElastiCache Redis (all shared state) and one S3 bucket of checkpoints.
#
#   internet -> ALB (public subnets) -> gateways :8000 (private) -> workers :8081 (private)
#                                        gateways, workers -> Redis :6379 (private, TLS + AUTH)
#                                        workers -> S3 checkpoint prefix (VPC endpoint)
#
# This module configures no provider: the caller does (see examples/minimal).

data "aws_region" "current" {}

data "aws_partition" "current" {}

locals {
  tags = merge({ "ember:deployment" = var.name, "managed-by" = "terraform" }, var.tags)
  # The wheel, when Ember is installed from S3: gateways and workers may read that one object.
  package_match      = regexall("^s3://([^/]+)/(.+)$", var.ember_package)
  package_object_arn = length(local.package_match) > 0 ? "arn:${data.aws_partition.current.partition}:s3:::${local.package_match[0][0]}/${local.package_match[0][1]}" : null
}

module "network" {
  source   = "./modules/network"
  name     = var.name
  vpc_cidr = var.vpc_cidr
  az_count = var.az_count
  tags     = local.tags
}

module "checkpoints" {
  source        = "./modules/checkpoints"
  name          = var.name
  bucket_name   = var.bucket_name
  kms_key_arn   = var.kms_key_arn
  force_destroy = var.force_destroy_bucket
  tags          = local.tags
}

module "secrets" {
  source           = "./modules/secrets"
  name             = var.name
  redis_auth_token = var.redis_auth_token
  admin_key        = var.admin_key
  cluster_token    = var.cluster_token
  secret_version   = var.secret_version
  tags             = local.tags
}

module "iam" {
  source             = "./modules/iam"
  name               = var.name
  bucket_arn         = module.checkpoints.bucket_arn
  checkpoint_prefix  = var.checkpoint_prefix
  kms_key_arn        = var.kms_key_arn
  package_object_arn = local.package_object_arn
  worker_secret_arns = [
    module.secrets.secret_arns["redis-auth-token"],
    module.secrets.secret_arns["cluster-token"],
  ]
  gateway_secret_arns = [
    module.secrets.secret_arns["redis-auth-token"],
    module.secrets.secret_arns["cluster-token"],
    module.secrets.secret_arns["admin-key"],
  ]
  gateway_generated_secret_arns = [
    module.secrets.secret_arns["cluster-token"],
    module.secrets.secret_arns["admin-key"],
  ]
  uploader_principal_arns = var.uploader_principal_arns
  tags                    = local.tags
}

module "redis" {
  source             = "./modules/redis"
  name               = var.name
  vpc_id             = module.network.vpc_id
  subnet_ids         = module.network.private_subnet_ids
  node_type          = var.redis_node_type
  num_cache_clusters = var.redis_num_cache_clusters
  engine_version     = var.redis_engine_version
  auth_token         = module.secrets.redis_auth_token
  client_security_group_ids = {
    gateway = module.gateway.security_group_id
    workers = module.workers.security_group_id
  }
  tags = local.tags
}

module "gateway" {
  source                        = "./modules/gateway"
  name                          = var.name
  vpc_id                        = module.network.vpc_id
  public_subnet_ids             = module.network.public_subnet_ids
  private_subnet_ids            = module.network.private_subnet_ids
  allowed_ingress_cidrs         = var.allowed_ingress_cidrs
  certificate_arn               = var.certificate_arn
  idle_timeout_s                = var.alb_idle_timeout_s
  instance_type                 = var.gateway_instance_type
  ami_id                        = var.gateway_ami_id
  min_size                      = var.gateway_min_size
  max_size                      = var.gateway_max_size
  desired_capacity              = var.gateway_desired_capacity
  instance_profile_name         = module.iam.gateway_instance_profile_name
  ember_package                 = var.ember_package
  region                        = data.aws_region.current.name
  redis_host                    = module.redis.primary_endpoint_address
  redis_port                    = module.redis.port
  redis_auth_token_secret_arn   = module.secrets.secret_arns["redis-auth-token"]
  cluster_token_secret_arn      = module.secrets.secret_arns["cluster-token"]
  admin_key_secret_arn          = module.secrets.secret_arns["admin-key"]
  initial_power_budget_w        = var.initial_power_budget_w
  worker_autoscaling_group_name = module.workers.autoscaling_group_name
  worker_max_size               = var.worker_max_size
  worker_min_nodes              = var.worker_min_nodes
  node_power_w                  = var.node_power_w
  extra_env                     = var.extra_env
  tags                          = local.tags
}

module "workers" {
  source                      = "./modules/workers"
  name                        = var.name
  vpc_id                      = module.network.vpc_id
  subnet_ids                  = module.network.private_subnet_ids
  gateway_security_group_id   = module.gateway.security_group_id
  instance_type               = var.worker_instance_type
  ami_id                      = var.worker_ami_id
  desired_capacity            = var.worker_desired_capacity
  max_size                    = var.worker_max_size
  root_volume_size_gb         = var.worker_root_volume_size_gb
  instance_profile_name       = module.iam.worker_instance_profile_name
  ember_package               = var.ember_package
  energy_mode                 = var.energy_mode
  region                      = data.aws_region.current.name
  redis_host                  = module.redis.primary_endpoint_address
  redis_port                  = module.redis.port
  redis_auth_token_secret_arn = module.secrets.secret_arns["redis-auth-token"]
  cluster_token_secret_arn    = module.secrets.secret_arns["cluster-token"]
  store_url                   = "s3://${module.checkpoints.bucket_name}/${var.checkpoint_prefix}"
  warm_pool_size              = var.worker_warm_pool_size
  launch_timeout_s            = var.worker_launch_timeout_s
  dram_percent                = var.worker_dram_percent
  extra_env                   = var.extra_env
  tags                        = local.tags
}
