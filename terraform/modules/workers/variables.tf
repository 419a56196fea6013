variable "name" {
  description = "Name prefix for every resource."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the workers."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets the workers run in."
  type        = list(string)
}

variable "gateway_security_group_id" {
  description = "Security group of the gateways: the only source allowed to reach a worker."
  type        = string
}

variable "instance_type" {
  description = "GPU instance type."
  type        = string
}

variable "ami_id" {
  description = "Pinned AMI with NVIDIA drivers (an AWS Deep Learning Base OSS Nvidia Driver GPU AMI, Ubuntu 22.04)."
  type        = string
}

variable "desired_capacity" {
  description = "Workers at creation; afterwards Ember's node scaler owns the group's size."
  type        = number
}

variable "max_size" {
  description = "Most workers the Auto Scaling group may run."
  type        = number
}

variable "root_volume_size_gb" {
  description = "Root EBS volume size (the SSD tier falls back to it when there is no instance store)."
  type        = number
}

variable "instance_profile_name" {
  description = "Instance profile granting read access to the checkpoint prefix and the worker secrets."
  type        = string
}

variable "ember_package" {
  description = "What pip installs: a requirement (e.g. ember==0.1.0) or an s3:// URL of a wheel."
  type        = string
}

variable "energy_mode" {
  description = "Energy controller mode: observe, recommend or actuate."
  type        = string
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

variable "store_url" {
  description = "Checkpoint store URL, s3://<bucket>/<prefix>."
  type        = string
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "dram_percent" {
  description = "Share of host memory for the DRAM tier, in percent (its tmpfs gets this plus max(2 GiB, 5%) headroom)."
  type        = number
  default     = 50
}

variable "extra_env" {
  description = "EMBER_* settings for the worker process (non-secret)."
  type        = map(string)
  default     = {}
}

variable "warm_pool_size" {
  description = "Stopped, pre-initialised workers kept for fast scale-out (0: no warm pool)."
  type        = number
  default     = 1
}

variable "drain_timeout_s" {
  description = "How long a terminating worker waits for Ember to drain it (lifecycle hook heartbeat)."
  type        = number
  default     = 900
}

variable "launch_timeout_s" {
  description = "How long a new worker may take to set itself up (install Ember, prepare disks, read secrets) before the ember-launch hook lets it go on anyway: into service, or stopped into the warm pool."
  type        = number
  default     = 1800
}
