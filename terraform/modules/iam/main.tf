# Least privilege, one role per job:
#   workers   read checkpoint objects under the prefix (and list only that prefix); complete their
#             own launch hook (only in a group tagged as this deployment's workers)
#   gateways  read nothing from the bucket (only the Ember wheel, when it is installed from there);
#             size and drain the worker group (only a group tagged as this deployment's workers)
#             and put metrics (only in the Ember namespace)
#   uploader  the only role that writes checkpoints
# Every policy is built with jsonencode(): offline test mocks would fill an
# aws_iam_policy_document's JSON with random text.

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

locals {
  prefix_objects_arn = "${var.bucket_arn}/${var.checkpoint_prefix}/*"
  list_prefix_condition = {
    StringLike = { "s3:prefix" = ["${var.checkpoint_prefix}/", "${var.checkpoint_prefix}/*"] }
  }
  uploader_principals = length(var.uploader_principal_arns) > 0 ? var.uploader_principal_arns : [
    "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"
  ]

  # Scaling calls have no group ARN to name before the group exists: its tags say whose it is.
  worker_group_condition = {
    StringEquals = {
      "autoscaling:ResourceTag/ember:deployment" = var.name
      "autoscaling:ResourceTag/ember:role"       = "worker"
    }
  }

  ec2_assume_role = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })

  package_statements = var.package_object_arn == null ? [] : [{
    Sid      = "ReadEmberPackage"
    Effect   = "Allow"
    Action   = ["s3:GetObject"]
    Resource = [var.package_object_arn]
  }]
  kms_read_statements = var.kms_key_arn == null ? [] : [{
    Sid      = "DecryptCheckpoints"
    Effect   = "Allow"
    Action   = ["kms:Decrypt"]
    Resource = [var.kms_key_arn]
  }]
  kms_write_statements = var.kms_key_arn == null ? [] : [{
    Sid      = "EncryptCheckpoints"
    Effect   = "Allow"
    Action   = ["kms:Decrypt", "kms:GenerateDataKey"]
    Resource = [var.kms_key_arn]
  }]
}

# --- workers ---------------------------------------------------------------------------

resource "aws_iam_role" "worker" {
  name_prefix        = "${var.name}-worker-"
  description        = "Ember GPU workers: read checkpoints, read their boot secrets"
  assume_role_policy = local.ec2_assume_role
  tags               = var.tags
}

resource "aws_iam_role_policy" "worker" {
  name = "ember-worker"
  role = aws_iam_role.worker.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid      = "ReadCheckpoints"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = [local.prefix_objects_arn]
      },
      {
        Sid       = "ListCheckpoints"
        Effect    = "Allow"
        Action    = ["s3:ListBucket"]
        Resource  = [var.bucket_arn]
        Condition = local.list_prefix_condition
      },
      {
        Sid      = "ReadBootSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = var.worker_secret_arns
      },
      {
        # A new worker completes its own launch hook (ember-launch) once set up: only in the group
        # tagged as this deployment's workers.
        Sid       = "CompleteOwnLaunch"
        Effect    = "Allow"
        Action    = ["autoscaling:CompleteLifecycleAction"]
        Resource  = ["*"]
        Condition = local.worker_group_condition
      },
    ], local.package_statements, local.kms_read_statements)
  })
}

resource "aws_iam_instance_profile" "worker" {
  name_prefix = "${var.name}-worker-"
  role        = aws_iam_role.worker.name
  tags        = var.tags
}

# --- gateways --------------------------------------------------------------------------

resource "aws_iam_role" "gateway" {
  name_prefix        = "${var.name}-gateway-"
  description        = "Ember gateways: read their boot secrets, nothing in the checkpoint bucket"
  assume_role_policy = local.ec2_assume_role
  tags               = var.tags
}

resource "aws_iam_role_policy" "gateway" {
  name = "ember-gateway"
  role = aws_iam_role.gateway.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid      = "ReadBootSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = var.gateway_secret_arns
      },
      {
        # The first gateway generates the cluster token and admin key when none was given.
        Sid      = "CreateGeneratedSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:PutSecretValue"]
        Resource = var.gateway_generated_secret_arns
      },
      {
        # The node scaler: only on the group tagged as this deployment's workers.
        Sid    = "ScaleOwnWorkerGroup"
        Effect = "Allow"
        Action = [
          "autoscaling:SetDesiredCapacity",
          "autoscaling:TerminateInstanceInAutoScalingGroup",
          "autoscaling:SetInstanceProtection",
          "autoscaling:CompleteLifecycleAction",
        ]
        Resource  = ["*"]
        Condition = local.worker_group_condition
      },
      {
        # Describe calls have no resource-level permissions.
        Sid      = "DescribeGroups"
        Effect   = "Allow"
        Action   = ["autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances"]
        Resource = ["*"]
      },
      {
        Sid       = "PutEmberMetrics"
        Effect    = "Allow"
        Action    = ["cloudwatch:PutMetricData"]
        Resource  = ["*"]
        Condition = { StringEquals = { "cloudwatch:namespace" = var.metrics_namespace } }
      },
    ], local.package_statements)
  })
}

resource "aws_iam_instance_profile" "gateway" {
  name_prefix = "${var.name}-gateway-"
  role        = aws_iam_role.gateway.name
  tags        = var.tags
}

# --- operator access (Session Manager instead of SSH) -----------------------------------

resource "aws_iam_role_policy_attachment" "ssm" {
  for_each   = var.enable_ssm ? { worker = aws_iam_role.worker.name, gateway = aws_iam_role.gateway.name } : {}
  role       = each.value
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# --- uploader --------------------------------------------------------------------------

resource "aws_iam_role" "uploader" {
  name_prefix = "${var.name}-uploader-"
  description = "The only role that writes Ember checkpoints"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { AWS = local.uploader_principals }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy" "uploader" {
  name = "ember-uploader"
  role = aws_iam_role.uploader.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid    = "WriteCheckpoints"
        Effect = "Allow"
        Action = [
          "s3:GetObject",
          "s3:PutObject",
          "s3:DeleteObject",
          "s3:AbortMultipartUpload",
          "s3:ListMultipartUploadParts",
        ]
        Resource = [local.prefix_objects_arn]
      },
      {
        Sid       = "ListCheckpoints"
        Effect    = "Allow"
        Action    = ["s3:ListBucket"]
        Resource  = [var.bucket_arn]
        Condition = local.list_prefix_condition
      },
    ], local.kms_write_statements)
  })
}
