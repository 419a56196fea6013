terraform {
  # 1.11: write-only arguments (secret_string_wo); 1.9 already let validations refer to other variables.
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.100, < 6.0"
    }
  }
}
