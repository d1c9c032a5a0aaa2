"""The Hugging Face remote-code model for every placement (copied into exported directories).

The two files here import nothing from this project: they travel with the weights."""
