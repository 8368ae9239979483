"""Images: matrix → locks → Dockerfiles → built images."""
