"""The audio pipeline of a session: codecs and resampling, VAD segments, the streaming transcriber."""
