"""The learning-signal study: every registered method pretrained under one budget on the scenes."""
