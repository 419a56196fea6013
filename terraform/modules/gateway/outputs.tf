output "url" {
  description = "Public URL of the Ember API."
  value       = "${local.https ? "https" : "http"}://${aws_lb.this.dns_name}"
}

output "alb_dns_name" {
  description = "DNS name of the load balancer (point a CNAME or alias at it)."
  value       = aws_lb.this.dns_name
}

output "security_group_id" {
  description = "Security group of the gateway instances."
  value       = aws_security_group.gateway.id
}

output "alb_security_group_id" {
  description = "Security group of the load balancer."
  value       = aws_security_group.alb.id
}

output "autoscaling_group_name" {
  description = "Auto Scaling group of the gateways."
  value       = aws_autoscaling_group.this.name
}

output "user_data" {
  description = "The rendered gateway bootstrap script (it contains no secret)."
  value       = local.user_data
}

output "ami_id" {
  description = "The pinned gateway AMI."
  value       = aws_launch_template.this.image_id
}
