"""Chatting with a base and its adapters: the engine and the sources it offers."""
