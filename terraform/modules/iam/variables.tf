variable "name" {
  description = "Name prefix for roles, profiles and policies."
  type        = string
}

variable "bucket_arn" {
  description = "ARN of the checkpoint bucket."
  type        = string
}

variable "checkpoint_prefix" {
  description = "Key prefix (no slashes at either end) under which checkpoints live."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key encrypting the bucket, or null for SSE-S3."
  type        = string
  default     = null
}

variable "package_object_arn" {
  description = "ARN of the Ember wheel in S3 that gateways and workers install, or null when Ember comes from a package index."
  type        = string
  default     = null
}

variable "worker_secret_arns" {
  description = "Secrets the workers read at boot (Redis token, cluster token)."
  type        = list(string)
}

variable "gateway_secret_arns" {
  description = "Secrets the gateways read at boot (Redis token, cluster token, admin key)."
  type        = list(string)
}

variable "uploader_principal_arns" {
  description = "Principals allowed to assume the uploader role; empty means this account's root (i.e. IAM decides)."
  type        = list(string)
  default     = []
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore so operators reach instances by Session Manager (no SSH)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "gateway_generated_secret_arns" {
  description = "Secrets the first gateway generates when the deployment gives none (cluster token, admin key)."
  type        = list(string)
  default     = []
}

variable "metrics_namespace" {
  description = "The only CloudWatch namespace gateways may put metrics in."
  type        = string
  default     = "Ember"
}
