# Redis is encrypted at rest and in transit, needs an AUTH token, sits in private subnets
# and accepts connections only from the gateway and worker security groups.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name               = "ember"
  vpc_id             = "vpc-0123456789abcdef0"
  subnet_ids         = ["subnet-private-a", "subnet-private-b"]
  node_type          = "cache.t4g.medium"
  num_cache_clusters = 2
  auth_token         = "abcdefghijklmnopqrstuvwxyz0123456789"
  client_security_group_ids = {
    gateway = "sg-gateway"
    workers = "sg-workers"
  }
}

run "redis_is_encrypted_and_private" {
  command = apply

  module {
    source = "./modules/redis"
  }

  assert {
    condition     = aws_elasticache_replication_group.this.transit_encryption_enabled && aws_elasticache_replication_group.this.at_rest_encryption_enabled
    error_message = "Redis must be encrypted in transit and at rest."
  }

  assert {
    condition     = aws_elasticache_replication_group.this.transit_encryption_mode == "required"
    error_message = "Redis must refuse plaintext connections."
  }

  assert {
    condition     = nonsensitive(aws_elasticache_replication_group.this.auth_token == var.auth_token)
    error_message = "Redis must require the AUTH token."
  }

  assert {
    condition     = toset(aws_elasticache_subnet_group.this.subnet_ids) == toset(var.subnet_ids)
    error_message = "Redis must live only in the given private subnets."
  }

  assert {
    condition     = aws_elasticache_replication_group.this.security_group_ids == toset([aws_security_group.this.id])
    error_message = "Redis must use only its own security group."
  }

  assert {
    condition     = toset([for r in aws_vpc_security_group_ingress_rule.clients : r.referenced_security_group_id]) == toset(["sg-gateway", "sg-workers"])
    error_message = "Only the gateway and worker security groups may reach Redis."
  }

  assert {
    condition     = alltrue([for r in aws_vpc_security_group_ingress_rule.clients : r.cidr_ipv4 == null && r.cidr_ipv6 == null && r.prefix_list_id == null])
    error_message = "No address range may reach Redis."
  }

  assert {
    condition     = alltrue([for r in aws_vpc_security_group_ingress_rule.clients : r.from_port == 6379 && r.to_port == 6379 && r.ip_protocol == "tcp"])
    error_message = "Clients may reach the Redis port only."
  }

  assert {
    condition     = aws_elasticache_replication_group.this.automatic_failover_enabled && aws_elasticache_replication_group.this.multi_az_enabled
    error_message = "Two or more nodes must fail over across zones."
  }

  assert {
    condition     = aws_elasticache_replication_group.this.snapshot_retention_limit > 0
    error_message = "Durable state (specs, keys, budgets) needs snapshots."
  }
}

run "single_node_has_no_failover" {
  command = plan

  module {
    source = "./modules/redis"
  }

  variables {
    num_cache_clusters = 1
  }

  assert {
    condition     = !aws_elasticache_replication_group.this.automatic_failover_enabled
    error_message = "A single node cannot fail over."
  }
}
