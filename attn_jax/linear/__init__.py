"""Linear attention: chunked recurrences with decays, feature maps, segments and a decoding step."""
