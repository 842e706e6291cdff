"""The small pretrained bases: models of the field's classes trained from scratch on the embedded data
(`world`), their training recipes (`build`), the cache and presets (`cache`) and quality bars (`quality`)."""
