"""Small linen modules shared by the models."""
