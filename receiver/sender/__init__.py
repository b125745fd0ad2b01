"""`tap-receiver send`: a test sender that plays audio to a receiver as the real senders do, then
checks the recording through its API (see receiver.sender.command)."""
