# Private subnets have no route from the internet and hand out no public addresses.

mock_provider "aws" {
  source = "./tests/mocks"
}

run "private_subnets_are_private" {
  command = apply

  module {
    source = "./modules/network"
  }

  variables {
    name     = "ember"
    vpc_cidr = "10.42.0.0/16"
    az_count = 2
  }

  assert {
    condition     = length(aws_subnet.private) == 2 && length(aws_subnet.public) == 2
    error_message = "One public and one private subnet per zone."
  }

  assert {
    condition     = alltrue([for s in concat(aws_subnet.private, aws_subnet.public) : !s.map_public_ip_on_launch])
    error_message = "No subnet may give instances a public address."
  }

  assert {
    condition     = aws_route.private_nat.nat_gateway_id == aws_nat_gateway.this.id && aws_route.private_nat.gateway_id == null
    error_message = "Private subnets go out through the NAT gateway, never the internet gateway."
  }

  assert {
    condition     = alltrue([for a in aws_route_table_association.private : a.route_table_id == aws_route_table.private.id])
    error_message = "Every private subnet uses the private route table."
  }

  assert {
    condition     = toset([for s in aws_subnet.private : s.availability_zone]) == toset(["us-east-1a", "us-east-1b"])
    error_message = "Private subnets spread over distinct zones."
  }

  assert {
    condition     = length(setintersection(toset([for s in aws_subnet.private : s.cidr_block]), toset([for s in aws_subnet.public : s.cidr_block]))) == 0
    error_message = "Public and private subnets must not share ranges."
  }

  assert {
    condition     = length(aws_default_security_group.this.ingress) == 0 && length(aws_default_security_group.this.egress) == 0
    error_message = "The default security group must allow nothing."
  }
}
