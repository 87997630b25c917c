"""The WebSocket protocols: each turns its wire format into audio for the transcriber and its events back."""
