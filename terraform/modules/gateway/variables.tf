variable "name" {
  description = "Name prefix for every resource."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the gateways and the load balancer."
  type        = string
}

variable "public_subnet_ids" {
  description = "Public subnets for the load balancer."
  type        = list(string)
}

variable "private_subnet_ids" {
  description = "Private subnets the gateway instances run in."
  type        = list(string)
}

variable "allowed_ingress_cidrs" {
  description = "IPv4 CIDRs allowed to reach the load balancer."
  type        = list(string)
}

variable "certificate_arn" {
  description = "ACM certificate for HTTPS on 443 (HTTP then redirects), or null for plain HTTP on 80."
  type        = string
  default     = null
}

variable "idle_timeout_s" {
  description = "Load balancer idle timeout: longer than the longest pause in a token stream."
  type        = number
}

variable "instance_type" {
  description = "CPU instance type of the gateways."
  type        = string
}

variable "ami_id" {
  description = "Pinned Ubuntu 22.04 AMI."
  type        = string
}

variable "min_size" {
  description = "Fewest gateways."
  type        = number
}

variable "max_size" {
  description = "Most gateways."
  type        = number
}

variable "desired_capacity" {
  description = "Gateways to run."
  type        = number
}

variable "instance_profile_name" {
  description = "Instance profile granting read access to the gateway secrets."
  type        = string
}

variable "ember_package" {
  description = "What pip installs: a requirement (e.g. ember==0.1.0) or an s3:// URL of a wheel."
  type        = string
}

variable "torch_index_url" {
  description = "Package index torch is installed from first (the CPU build by default)."
  type        = string
  default     = "https://download.pytorch.org/whl/cpu"
}

variable "region" {
  description = "AWS region (for the SDK on the instance)."
  type        = string
}

variable "redis_host" {
  description = "Primary endpoint of the Redis replication group."
  type        = string
}

variable "redis_port" {
  description = "Redis port."
  type        = number
}

variable "redis_auth_token_secret_arn" {
  description = "Secret holding the Redis AUTH token."
  type        = string
}

variable "cluster_token_secret_arn" {
  description = "Secret holding the gateway <-> worker cluster token."
  type        = string
}

variable "admin_key_secret_arn" {
  description = "Secret holding the admin API key."
  type        = string
}

variable "initial_power_budget_w" {
  description = "Cluster power budget the first gateway writes to Redis when Redis holds none."
  type        = number
}

variable "deletion_protection" {
  description = "Protect the load balancer from deletion."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "worker_autoscaling_group_name" {
  description = "The workers' Auto Scaling group the gateways' node scaler sizes."
  type        = string
}

variable "worker_max_size" {
  description = "Most workers the node scaler may run."
  type        = number
}

variable "node_power_w" {
  description = "The most one worker node's GPUs may draw in watts (the power budget caps nodes at budget / this); 300: one A10G (g5.xlarge)."
  type        = number
  default     = 300
}

variable "node_boot_s" {
  description = "Seconds from scale-out to a registered worker (weighed against idle watts at scale-in)."
  type        = number
  default     = 300
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of the node scaler's metrics."
  type        = string
  default     = "Ember"
}

variable "extra_env" {
  description = "EMBER_* settings for the gateway process (non-secret)."
  type        = map(string)
  default     = {}
}

variable "worker_min_nodes" {
  description = "Fewest workers the node scaler keeps up (0: scale to zero; the first request then waits for a boot)."
  type        = number
  default     = 1
}
