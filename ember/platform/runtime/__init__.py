"""Model execution: a loaded model instance that generates and streams tokens."""
