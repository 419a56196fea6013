variable "name" {
  description = "Name prefix for every resource."
  type        = string
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC (a /16 to /20)."
  type        = string
}

variable "az_count" {
  description = "How many availability zones to spread subnets over."
  type        = number
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
