"""CLI verbs, one module per area. Each verb is a thin shell over a function in a subpackage."""
