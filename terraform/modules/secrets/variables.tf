variable "name" {
  description = "Name prefix; secrets are named <name>/<secret>."
  type        = string
}

variable "redis_auth_token" {
  description = "Redis AUTH token, or null to generate one."
  type        = string
  default     = null
  sensitive   = true
}

variable "admin_key" {
  description = "Ember admin API key, or null to generate one."
  type        = string
  default     = null
  sensitive   = true
}

variable "recovery_window_in_days" {
  description = "Days a deleted secret can still be restored (0 deletes at once)."
  type        = number
  default     = 7
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
