output "security_group_id" {
  description = "Security group of the workers."
  value       = aws_security_group.this.id
}

output "autoscaling_group_name" {
  description = "Auto Scaling group of the workers."
  value       = aws_autoscaling_group.this.name
}

output "launch_template_id" {
  description = "Launch template of the workers."
  value       = aws_launch_template.this.id
}

output "user_data" {
  description = "The rendered worker bootstrap script (it contains no secret)."
  value       = local.user_data
}

output "autoscaling_group_arn" {
  description = "ARN of the workers' Auto Scaling group."
  value       = aws_autoscaling_group.this.arn
}

output "ami_id" {
  description = "The pinned worker AMI."
  value       = aws_launch_template.this.image_id
}
