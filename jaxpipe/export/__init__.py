"""Using a checkpoint outside training: Hugging Face export and sampling."""
