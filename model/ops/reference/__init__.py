"""The PyTorch references: the specification every fast form is tested against."""
