output "redis_auth_token" {
  description = "The Redis AUTH token (for the replication group)."
  value       = aws_secretsmanager_secret_version.redis.secret_string
  sensitive   = true
}

output "secret_arns" {
  description = "ARN of each secret: redis-auth-token, cluster-token, admin-key."
  value       = { for k, s in aws_secretsmanager_secret.this : k => s.arn }
}

output "written_versions" {
  description = "secret_version each given write-only secret (cluster-token, admin-key) was last written with."
  value       = { for k, v in aws_secretsmanager_secret_version.given : k => v.secret_string_wo_version }
}
