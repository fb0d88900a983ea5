"""Side-by-side benchmark of the broker and ``bao proxy``; see bench/README.md."""
