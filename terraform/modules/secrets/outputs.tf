output "redis_auth_token" {
  description = "The Redis AUTH token (for the replication group)."
  value       = aws_secretsmanager_secret_version.redis.secret_string
  sensitive   = true
}

output "secret_arns" {
  description = "ARN of each secret: redis-auth-token, cluster-token, admin-key."
  value       = { for k, s in aws_secretsmanager_secret.this : k => s.arn }
}
