"""The first stage of a large index: an image-level search (a VLAD vector per image) whose top K
images alone are searched descriptor by descriptor, from their rows stored image-major."""
