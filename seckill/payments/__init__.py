"""Payment providers: one small interface, WeChat Pay v3 behind it, and a local WeChat Pay."""
