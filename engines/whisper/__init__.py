"""Whisper itself: the model, its decoding rules, tokenizer, text stage, audio front end and word timings."""
