"""The door between serving and observing: the tap that takes answered calls off the serving path, and the batched
frames that carry them to the observing process."""
