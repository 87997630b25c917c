"""The server process: the listener and its HTTP side, who may connect, admission, keepalive, workers."""
