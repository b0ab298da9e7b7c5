"""Tasks: specs (template, verbalizer or target), built-in and local datasets, encoding rows into batches."""
