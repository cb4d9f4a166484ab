"""Running models: data readers and (lazily) onnxruntime."""
