variable "name" {
  description = "Name prefix; the bucket is named <name>-checkpoints-<suffix> unless bucket_name is set."
  type        = string
}

variable "bucket_name" {
  description = "Exact bucket name, or null for a unique name derived from var.name."
  type        = string
  default     = null
}

variable "kms_key_arn" {
  description = "KMS key for server-side encryption, or null for SSE-S3 (AES256)."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete a bucket that still holds checkpoints."
  type        = bool
  default     = false
}

variable "noncurrent_version_expiration_days" {
  description = "Days an overwritten or deleted checkpoint object is kept (versioning)."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
