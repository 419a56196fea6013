# Least privilege: workers read only the checkpoint prefix, gateways read nothing from the
# bucket, and only the uploader role writes.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name                          = "ember"
  bucket_arn                    = "arn:aws:s3:::ember-ckpt"
  checkpoint_prefix             = "checkpoints"
  worker_secret_arns            = ["arn:aws:secretsmanager:us-east-1:123456789012:secret:redis", "arn:aws:secretsmanager:us-east-1:123456789012:secret:cluster"]
  gateway_generated_secret_arns = ["arn:aws:secretsmanager:us-east-1:123456789012:secret:cluster", "arn:aws:secretsmanager:us-east-1:123456789012:secret:admin"]
  gateway_secret_arns           = ["arn:aws:secretsmanager:us-east-1:123456789012:secret:redis", "arn:aws:secretsmanager:us-east-1:123456789012:secret:cluster", "arn:aws:secretsmanager:us-east-1:123456789012:secret:admin"]
}

run "roles_are_scoped_to_the_prefix" {
  command = apply

  module {
    source = "./modules/iam"
  }

  # Workers: GetObject on the prefix only, ListBucket only under the prefix, nothing that writes.
  assert {
    condition = alltrue(flatten([
      for s in jsondecode(aws_iam_role_policy.worker.policy).Statement : [
        for a in s.Action : !startswith(a, "s3:") || (
          (a == "s3:GetObject" && s.Resource == ["arn:aws:s3:::ember-ckpt/checkpoints/*"]) ||
          (a == "s3:ListBucket" && s.Resource == ["arn:aws:s3:::ember-ckpt"] && try(s.Condition.StringLike["s3:prefix"], null) == ["checkpoints/", "checkpoints/*"])
        )
      ]
    ]))
    error_message = "Workers may only read objects under the checkpoint prefix and list that prefix."
  }

  assert {
    condition = anytrue([
      for s in jsondecode(aws_iam_role_policy.worker.policy).Statement :
      contains(s.Action, "s3:GetObject") && s.Resource == ["arn:aws:s3:::ember-ckpt/checkpoints/*"]
    ])
    error_message = "Workers must be able to read checkpoints."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.worker.policy).Statement :
      s.Effect == "Allow" && (alltrue([for r in s.Resource : r != "*"]) || (
        try(s.Condition.StringEquals["autoscaling:ResourceTag/ember:deployment"], "") == "ember" &&
        try(s.Condition.StringEquals["autoscaling:ResourceTag/ember:role"], "") == "worker"
      ))
    ])
    error_message = "The worker policy grants nothing on every resource, except on the group tagged as this deployment's workers."
  }

  # Gateways: no S3 at all when Ember comes from a package index.
  assert {
    condition = alltrue(flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : [for a in s.Action : !startswith(a, "s3:")]
    ]))
    error_message = "Gateways must read nothing from the bucket."
  }

  assert {
    condition = toset(flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : s.Resource if contains(s.Action, "secretsmanager:GetSecretValue")
    ])) == toset(var.gateway_secret_arns)
    error_message = "Gateways read exactly their own secrets."
  }

  assert {
    condition = toset(flatten([
      for s in jsondecode(aws_iam_role_policy.worker.policy).Statement : s.Resource if contains(s.Action, "secretsmanager:GetSecretValue")
    ])) == toset(var.worker_secret_arns)
    error_message = "Workers read exactly their own secrets (not the admin key)."
  }

  # Uploader: the only writer, and only under the prefix.
  assert {
    condition = anytrue([
      for s in jsondecode(aws_iam_role_policy.uploader.policy).Statement :
      contains(s.Action, "s3:PutObject") && s.Resource == ["arn:aws:s3:::ember-ckpt/checkpoints/*"]
    ])
    error_message = "The uploader must be able to write under the prefix."
  }

  assert {
    condition = alltrue(flatten([
      for s in jsondecode(aws_iam_role_policy.uploader.policy).Statement : [
        for r in s.Resource : r == "arn:aws:s3:::ember-ckpt/checkpoints/*" || r == "arn:aws:s3:::ember-ckpt"
      ]
    ]))
    error_message = "The uploader may touch nothing outside the checkpoint bucket's prefix."
  }

  assert {
    condition     = jsondecode(aws_iam_role.worker.assume_role_policy).Statement[0].Principal.Service == "ec2.amazonaws.com"
    error_message = "Only EC2 instances may assume the worker role."
  }

  # Gateways: the node scaler's calls only on this deployment's worker group.
  assert {
    condition = alltrue(flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : [
        for a in s.Action : (
          try(s.Condition.StringEquals["autoscaling:ResourceTag/ember:deployment"], "") == "ember" &&
          try(s.Condition.StringEquals["autoscaling:ResourceTag/ember:role"], "") == "worker"
        ) if startswith(a, "autoscaling:") && !startswith(a, "autoscaling:Describe")
      ]
    ]))
    error_message = "Scaling calls are allowed only on the group tagged as this deployment's workers."
  }

  assert {
    condition = toset(flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : [
        for a in s.Action : a if startswith(a, "autoscaling:") && !startswith(a, "autoscaling:Describe")
      ]
    ])) == toset(["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup", "autoscaling:SetInstanceProtection", "autoscaling:CompleteLifecycleAction"])
    error_message = "Gateways get exactly the node scaler's calls."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement :
      try(s.Condition.StringEquals["cloudwatch:namespace"], "") == "Ember" if contains(s.Action, "cloudwatch:PutMetricData")
    ]) && anytrue([for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : contains(s.Action, "cloudwatch:PutMetricData")])
    error_message = "PutMetricData only in the Ember namespace."
  }

  assert {
    condition = toset(flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : s.Resource if contains(s.Action, "secretsmanager:PutSecretValue")
    ])) == toset(var.gateway_generated_secret_arns)
    error_message = "Gateways may create only the secrets they generate (cluster token, admin key)."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.worker.policy).Statement : alltrue([for a in s.Action : !startswith(a, "cloudwatch:")])
    ])
    error_message = "Workers get no metrics rights."
  }

  # A worker completes its own launch (the ember-launch hook), only in its own group, and scales nothing.
  assert {
    condition = [
      for s in jsondecode(aws_iam_role_policy.worker.policy).Statement : [
        s.Action, s.Resource,
        try(s.Condition.StringEquals["autoscaling:ResourceTag/ember:deployment"], ""),
        try(s.Condition.StringEquals["autoscaling:ResourceTag/ember:role"], ""),
      ] if anytrue([for a in s.Action : startswith(a, "autoscaling:")])
    ] == [[["autoscaling:CompleteLifecycleAction"], ["*"], "ember", "worker"]]
    error_message = "Workers may only call CompleteLifecycleAction, and only on the group tagged as this deployment's workers."
  }
}

run "wheel_in_s3_is_the_one_object_gateways_read" {
  command = apply

  module {
    source = "./modules/iam"
  }

  variables {
    package_object_arn = "arn:aws:s3:::ember-ckpt/packages/ember-0.1.0-py3-none-any.whl"
  }

  assert {
    condition = flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : s.Resource if anytrue([for a in s.Action : startswith(a, "s3:")])
    ]) == ["arn:aws:s3:::ember-ckpt/packages/ember-0.1.0-py3-none-any.whl"]
    error_message = "Gateways may read the Ember wheel and nothing else in S3."
  }

  assert {
    condition = alltrue(flatten([
      for s in jsondecode(aws_iam_role_policy.gateway.policy).Statement : [for a in s.Action : !startswith(a, "s3:") || a == "s3:GetObject"]
    ]))
    error_message = "Gateways may only get the wheel, not list or write."
  }
}
