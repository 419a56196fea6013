variable "name" {
  description = "Name prefix; also the replication group id."
  type        = string
}

variable "vpc_id" {
  description = "VPC to place Redis in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the cache nodes."
  type        = list(string)
}

variable "client_security_group_ids" {
  description = "Security groups allowed to connect, by role (e.g. {gateway = sg-1, workers = sg-2}). Nothing else can."
  type        = map(string)
}

variable "node_type" {
  description = "ElastiCache node type."
  type        = string
}

variable "num_cache_clusters" {
  description = "Nodes in the replication group (1 primary + replicas); 2 or more turns on failover."
  type        = number
}

variable "engine_version" {
  description = "Redis OSS engine version."
  type        = string
  default     = "7.1"
}

variable "auth_token" {
  description = "AUTH token (16-128 characters); clients need it in the rediss:// URL."
  type        = string
  sensitive   = true
}

variable "snapshot_retention_limit" {
  description = "Days of daily snapshots kept: function specs, keys and budgets are durable state."
  type        = number
  default     = 7
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
