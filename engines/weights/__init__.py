"""Model weights: checkpoints (OpenAI, Hugging Face, CTranslate2), their reading and conversion, fp16 packing."""
