"""Model definitions with real weights: BERT/BERT-tiny and MiniLM (`bert`, `minilm`, its tokenizer), the ViT
(`vit`), reading and writing model directories (`io`) and resolving a MODEL argument (`registry`).

Each model has one forward pass, its `nn.Module`; every other path (board, .tflite, enclave) works from its
captured graph (edge/capture.py)."""
