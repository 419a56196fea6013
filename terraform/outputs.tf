output "gateway_url" {
  description = "Public URL of the Ember API (OpenAI-compatible routes under /v1)."
  value       = module.gateway.url
}

output "alb_dns_name" {
  description = "DNS name of the load balancer."
  value       = module.gateway.alb_dns_name
}

output "bucket_name" {
  description = "Checkpoint bucket."
  value       = module.checkpoints.bucket_name
}

output "checkpoint_store_url" {
  description = "Store URL the workers read checkpoints from (upload there with the uploader role)."
  value       = "s3://${module.checkpoints.bucket_name}/${var.checkpoint_prefix}"
}

output "redis_endpoint" {
  description = "Primary endpoint of Redis (TLS and AUTH required: rediss://:<token>@<endpoint>:6379/0)."
  value       = module.redis.primary_endpoint_address
}

output "redis_port" {
  description = "Redis port."
  value       = module.redis.port
}

output "uploader_role_arn" {
  description = "The only role that may write checkpoints."
  value       = module.iam.uploader_role_arn
}

output "secret_arns" {
  description = "Secrets Manager ARNs: redis-auth-token, cluster-token, admin-key (read the admin key from here)."
  value       = module.secrets.secret_arns
}

output "vpc_id" {
  description = "VPC of the deployment."
  value       = module.network.vpc_id
}

output "gateway_autoscaling_group_name" {
  description = "Auto Scaling group of the gateways."
  value       = module.gateway.autoscaling_group_name
}

output "worker_autoscaling_group_name" {
  description = "Auto Scaling group of the GPU workers."
  value       = module.workers.autoscaling_group_name
}
