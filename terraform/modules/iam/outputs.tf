output "worker_instance_profile_name" {
  description = "Instance profile of the GPU workers."
  value       = aws_iam_instance_profile.worker.name
}

output "gateway_instance_profile_name" {
  description = "Instance profile of the gateways."
  value       = aws_iam_instance_profile.gateway.name
}

output "worker_role_arn" {
  description = "Role of the GPU workers."
  value       = aws_iam_role.worker.arn
}

output "gateway_role_arn" {
  description = "Role of the gateways."
  value       = aws_iam_role.gateway.arn
}

output "uploader_role_arn" {
  description = "The role that uploads checkpoints (assume it to run `ember checkpoint` uploads)."
  value       = aws_iam_role.uploader.arn
}
