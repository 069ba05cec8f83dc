"""The frozen teacher: batched hidden-state extraction and the on-disk cache it fills."""
