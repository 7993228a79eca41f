"""Backends run a model. The session talks to them only through `chat.backends.base.Backend`;
`chat.backends.select` picks one for a model path and the user's options."""
