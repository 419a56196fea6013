# --- general -----------------------------------------------------------------------------

variable "name" {
  description = "Name prefix for every resource (lowercase letters, digits, dashes)."
  type        = string
  default     = "ember"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,19}$", var.name))
    error_message = "name must be 2-20 characters: a lowercase letter, then lowercase letters, digits or dashes."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "ember_package" {
  description = "What gateways and workers install with pip: a requirement (\"ember==0.1.0\", \"ember @ https://...\") or the s3:// URL of an Ember wheel."
  type        = string

  validation {
    condition     = length(trimspace(var.ember_package)) > 0 && !can(regex("['\\n\\r\\\\]", var.ember_package))
    error_message = "ember_package must be a non-empty pip requirement or s3:// URL without quotes, backslashes or newlines."
  }

  validation {
    condition     = !startswith(var.ember_package, "s3://") || can(regex("^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^ ]+\\.whl$", var.ember_package))
    error_message = "An s3:// ember_package must name a wheel: s3://<bucket>/<key>.whl."
  }
}

# --- network -----------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC, /16 to /19 (its public subnets are the VPC's prefix + 8: an ALB needs /27 or larger)."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && can(regex("/(1[6-9])$", var.vpc_cidr))
    error_message = "vpc_cidr must be an IPv4 CIDR from /16 to /19: the public subnets (prefix + 8) must be /27 or larger for the load balancer."
  }
}

variable "az_count" {
  description = "Availability zones to spread over (ElastiCache failover and the ALB need at least 2)."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4 && floor(var.az_count) == var.az_count
    error_message = "az_count must be a whole number from 2 to 4."
  }
}

variable "allowed_ingress_cidrs" {
  description = "IPv4 CIDRs allowed to reach the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.allowed_ingress_cidrs) > 0 && alltrue([for c in var.allowed_ingress_cidrs : can(cidrhost(c, 0)) && can(regex("^[0-9.]+/[0-9]+$", c))])
    error_message = "allowed_ingress_cidrs must be a non-empty list of IPv4 CIDRs."
  }
}

variable "certificate_arn" {
  description = "ACM certificate ARN for HTTPS on 443 (HTTP 80 then redirects). Required unless allow_plain_http is set."
  type        = string
  default     = null

  validation {
    condition     = var.certificate_arn == null || can(regex("^arn:[a-z-]+:acm:", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN or null."
  }

  validation {
    condition     = var.certificate_arn != null || var.allow_plain_http
    error_message = "Give certificate_arn (HTTPS), or set allow_plain_http = true to serve API keys in clear text on port 80 knowingly."
  }
}

variable "allow_plain_http" {
  description = "Serve plain HTTP on 80 without a certificate (API keys then cross the network unencrypted)."
  type        = bool
  default     = false
}

# --- checkpoints -------------------------------------------------------------------------

variable "bucket_name" {
  description = "Exact name of the checkpoint bucket, or null for a unique <name>-checkpoints-... name."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, dots, dashes)."
  }
}

variable "checkpoint_prefix" {
  description = "Key prefix of the checkpoints in the bucket (the store URL is s3://<bucket>/<prefix>)."
  type        = string
  default     = "checkpoints"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must be one or more path segments, with no slash at either end."
  }
}

variable "kms_key_arn" {
  description = "KMS key to encrypt checkpoints with, or null for SSE-S3 (AES256)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:[a-z-]+:kms:", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN or null."
  }
}

variable "force_destroy_bucket" {
  description = "Let `terraform destroy` delete the bucket while it still holds checkpoints."
  type        = bool
  default     = false
}

variable "uploader_principal_arns" {
  description = "IAM principals allowed to assume the checkpoint uploader role; empty means this account (IAM policies decide who)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.uploader_principal_arns : can(regex("^arn:[a-z-]+:(iam|sts)::[0-9]{12}:", a))])
    error_message = "uploader_principal_arns must be IAM or STS ARNs."
  }
}

# --- redis -------------------------------------------------------------------------------

variable "redis_node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.t4g.medium"

  validation {
    condition     = can(regex("^cache\\.[a-z0-9]+\\.[a-z0-9]+$", var.redis_node_type))
    error_message = "redis_node_type must be an ElastiCache node type such as cache.t4g.medium."
  }
}

variable "redis_num_cache_clusters" {
  description = "Redis nodes (1 primary + replicas); 2 or more enables automatic failover across zones."
  type        = number
  default     = 2

  validation {
    condition     = var.redis_num_cache_clusters >= 1 && var.redis_num_cache_clusters <= 6 && floor(var.redis_num_cache_clusters) == var.redis_num_cache_clusters
    error_message = "redis_num_cache_clusters must be a whole number from 1 to 6."
  }
}

variable "redis_engine_version" {
  description = "Redis OSS engine version (7.x: in-transit encryption mode \"required\" needs 7.0.5 or later)."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^7\\.[0-9]+$", var.redis_engine_version))
    error_message = "redis_engine_version must be a Redis OSS 7.x version such as 7.1."
  }
}

variable "redis_auth_token" {
  description = "Redis AUTH token, or null to have Secrets Manager generate one. Kept in Secrets Manager either way."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.redis_auth_token == null || can(regex("^[A-Za-z0-9!&#$^<>-]{16,128}$", var.redis_auth_token))
    error_message = "redis_auth_token must be 16-128 characters: letters, digits and ! & # $ ^ < > -."
  }
}

variable "cluster_token" {
  description = "Gateway <-> worker token, or null: the first gateway generates it. Written write-only: never in state."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.cluster_token == null || can(regex("^[A-Za-z0-9_-]{24,256}$", var.cluster_token))
    error_message = "cluster_token must be 24-256 letters, digits, - or _."
  }
}

variable "admin_key" {
  description = "Ember admin API key, or null: the first gateway generates it. Written write-only: never in state."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.admin_key == null || can(regex("^[A-Za-z0-9_.~+/=-]{24,256}$", var.admin_key))
    error_message = "admin_key must be 24-256 characters: letters, digits and _ . ~ + / = -."
  }
}

variable "secret_version" {
  description = "Version of the given cluster_token and admin_key (written write-only, so terraform cannot see a change): raise it to write new values, i.e. to rotate them."
  type        = number
  default     = 1

  validation {
    condition     = var.secret_version >= 1 && floor(var.secret_version) == var.secret_version
    error_message = "secret_version must be a whole number, at least 1; raise it to write a new cluster_token or admin_key."
  }
}

# --- gateways ----------------------------------------------------------------------------

variable "gateway_instance_type" {
  description = "CPU instance type of the gateways."
  type        = string
  default     = "c7i.large"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.gateway_instance_type)) && !can(regex("^(p[0-9]|g[0-9]|inf|trn|dl)", var.gateway_instance_type))
    error_message = "gateway_instance_type must be an EC2 instance type without accelerators (e.g. c7i.large)."
  }
}

variable "gateway_ami_id" {
  description = "Pinned gateway AMI (Canonical Ubuntu 22.04; see README for the lookup). A new one rolls out by instance refresh, one gateway at a time."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.gateway_ami_id))
    error_message = "gateway_ami_id must look like ami-0123456789abcdef0."
  }
}

variable "gateway_min_size" {
  description = "Fewest gateways."
  type        = number
  default     = 1

  validation {
    condition     = var.gateway_min_size >= 1 && floor(var.gateway_min_size) == var.gateway_min_size
    error_message = "gateway_min_size must be a whole number, at least 1."
  }
}

variable "gateway_desired_capacity" {
  description = "Gateways to run."
  type        = number
  default     = 2

  validation {
    condition     = var.gateway_desired_capacity >= var.gateway_min_size && var.gateway_desired_capacity <= var.gateway_max_size
    error_message = "gateway_desired_capacity must lie between gateway_min_size and gateway_max_size."
  }
}

variable "gateway_max_size" {
  description = "Most gateways."
  type        = number
  default     = 4

  validation {
    condition     = var.gateway_max_size >= 1 && var.gateway_max_size <= 100 && floor(var.gateway_max_size) == var.gateway_max_size
    error_message = "gateway_max_size must be a whole number from 1 to 100."
  }
}

variable "alb_idle_timeout_s" {
  description = "Load balancer idle timeout in seconds: SSE token streams can pause for minutes during a cold start."
  type        = number
  default     = 900

  validation {
    condition     = var.alb_idle_timeout_s >= 300 && var.alb_idle_timeout_s <= 4000
    error_message = "alb_idle_timeout_s must be from 300 to 4000 seconds."
  }
}

variable "initial_power_budget_w" {
  description = "Cluster power budget in watts that the first gateway writes to Redis when Redis holds none; afterwards Redis holds the truth (change it with `ember energy`)."
  type        = number
  default     = 2800

  validation {
    condition     = var.initial_power_budget_w >= 100 && var.initial_power_budget_w <= 10000000
    error_message = "initial_power_budget_w must be from 100 W to 10 MW."
  }

  validation {
    # Under one node's watts the node scaler could never add a node (it keeps only worker_min_nodes).
    condition     = var.initial_power_budget_w >= var.node_power_w
    error_message = "initial_power_budget_w must be at least node_power_w (one worker node's watts): a smaller budget lets the node scaler run no node beyond worker_min_nodes."
  }
}

# --- workers -----------------------------------------------------------------------------

variable "worker_instance_type" {
  description = "GPU instance type of the workers (g5.xlarge: one A10G and a 250 GB NVMe instance store)."
  type        = string
  default     = "g5.xlarge"

  validation {
    # x86 NVIDIA families only: the AMI is x86, and g4ad (AMD) or g5g (Arm) would not boot it.
    condition     = can(regex("^(p4d|p4de|p5|p5e|p5en|p6-b200|g4dn|g5|g6|g6e|gr6)\\.([0-9]*xlarge|large|metal)$", var.worker_instance_type))
    error_message = "worker_instance_type must be an x86 NVIDIA GPU instance type (p4d, p5, p6-b200, g4dn, g5, g6, g6e, gr6 families; e.g. g5.xlarge, p5.48xlarge)."
  }

  validation {
    condition     = !can(regex("^p3", var.worker_instance_type))
    error_message = "p3 instances carry V100 GPUs, which the Deep Learning Base OSS Nvidia Driver AMI's driver no longer supports."
  }
}

variable "worker_ami_id" {
  description = "Pinned worker AMI: an AWS Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04; see README for the lookup)."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.worker_ami_id))
    error_message = "worker_ami_id must look like ami-0123456789abcdef0."
  }
}

variable "worker_desired_capacity" {
  description = "GPU workers at creation; afterwards the gateways' node scaler sizes the group (terraform ignores later changes)."
  type        = number
  default     = 1

  validation {
    condition     = var.worker_desired_capacity >= 0 && var.worker_desired_capacity <= var.worker_max_size && floor(var.worker_desired_capacity) == var.worker_desired_capacity
    error_message = "worker_desired_capacity must be a whole number from 0 to worker_max_size."
  }
}

variable "worker_max_size" {
  description = "Most GPU workers."
  type        = number
  default     = 4

  validation {
    condition     = var.worker_max_size >= 1 && var.worker_max_size <= 1000 && floor(var.worker_max_size) == var.worker_max_size
    error_message = "worker_max_size must be a whole number from 1 to 1000."
  }
}

variable "worker_root_volume_size_gb" {
  description = "Root EBS volume of a worker in GB (drivers, CUDA wheels, and the SSD tier when there is no instance store)."
  type        = number
  default     = 200

  validation {
    condition     = var.worker_root_volume_size_gb >= 60 && var.worker_root_volume_size_gb <= 16384
    error_message = "worker_root_volume_size_gb must be from 60 to 16384."
  }
}

variable "energy_mode" {
  description = "Worker energy controller: observe (measure only), recommend (compute settings, change nothing) or actuate (set power limits and clocks; runs the worker as root)."
  type        = string
  default     = "recommend"

  validation {
    condition     = contains(["observe", "recommend", "actuate"], var.energy_mode)
    error_message = "energy_mode must be observe, recommend or actuate."
  }
}

variable "worker_warm_pool_size" {
  description = "Stopped, pre-initialised workers kept in a warm pool for fast scale-out (0: none)."
  type        = number
  default     = 1

  validation {
    condition     = var.worker_warm_pool_size >= 0 && var.worker_warm_pool_size <= 100 && floor(var.worker_warm_pool_size) == var.worker_warm_pool_size
    error_message = "worker_warm_pool_size must be a whole number from 0 to 100."
  }
}

variable "worker_launch_timeout_s" {
  description = "How long a new worker may take to set itself up before its launch lifecycle hook (ember-launch) lets it go on anyway; the worker completes the hook itself when ready."
  type        = number
  default     = 1800

  validation {
    condition     = var.worker_launch_timeout_s >= 30 && var.worker_launch_timeout_s <= 7200 && floor(var.worker_launch_timeout_s) == var.worker_launch_timeout_s
    error_message = "worker_launch_timeout_s must be a whole number of seconds from 30 to 7200 (the lifecycle hook's limits)."
  }
}

variable "worker_dram_percent" {
  description = "Share of a worker's memory for the DRAM tier, in percent; its tmpfs gets this plus max(2 GiB, 5%) headroom."
  type        = number
  default     = 50

  validation {
    condition     = var.worker_dram_percent >= 5 && var.worker_dram_percent <= 80
    error_message = "worker_dram_percent must be from 5 to 80 (the tmpfs adds headroom; the rest runs the system and the model code)."
  }
}

variable "node_power_w" {
  description = "The most one worker node's GPUs may draw in watts (the power budget is GPU watts): the node scaler runs at most power budget / this many nodes. The default fits the default worker_instance_type, g5.xlarge: one A10G, 300 W board power; set it with the type (e.g. 5600 for p5.48xlarge: 8 H100 at 700 W)."
  type        = number
  default     = 300

  validation {
    condition     = var.node_power_w >= 100
    error_message = "node_power_w must be at least 100 W."
  }
}

variable "extra_env" {
  description = "Any EMBER_* setting for gateways and workers (e.g. EMBER_SLO_TIMEOUT_S = \"60\"); non-secret values only."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.extra_env : can(regex("^EMBER_[A-Z0-9_]+$", k))])
    error_message = "extra_env keys must be EMBER_ settings (upper case letters, digits, underscores)."
  }

  validation {
    condition     = alltrue([for k, v in var.extra_env : can(regex("^[^\"\\\\$`\r\n]*$", v))])
    error_message = "extra_env values must be one line without quotes, backslashes, $ or backticks."
  }

  validation {
    condition     = length(setintersection(keys(var.extra_env), ["EMBER_REDIS_URL", "EMBER_ADMIN_KEY", "EMBER_CLUSTER_TOKEN"])) == 0
    error_message = "Secrets do not go in extra_env: EMBER_REDIS_URL, EMBER_ADMIN_KEY and EMBER_CLUSTER_TOKEN come from Secrets Manager."
  }
}

variable "worker_min_nodes" {
  description = "Fewest GPU workers the gateways' node scaler keeps up (0 scales to zero: the first request then waits for a node to boot, longer than EMBER_SLO_TIMEOUT_S unless raised)."
  type        = number
  default     = 1

  validation {
    condition     = var.worker_min_nodes >= 0 && var.worker_min_nodes <= var.worker_max_size && floor(var.worker_min_nodes) == var.worker_min_nodes
    error_message = "worker_min_nodes must be a whole number from 0 to worker_max_size."
  }
}
