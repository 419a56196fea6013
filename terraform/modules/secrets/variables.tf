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
  description = "Ember admin API key (written write-only: never in state), or null: the first gateway generates it."
  type        = string
  default     = null
  sensitive   = true
}

variable "cluster_token" {
  description = "Gateway <-> worker cluster token (written write-only), or null: the first gateway generates it."
  type        = string
  default     = null
  sensitive   = true
}

variable "secret_version" {
  description = "Version of the given write-only secrets (cluster token, admin key): bump it to write new values."
  type        = number
  default     = 1
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
