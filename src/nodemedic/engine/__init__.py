"""Decision making: pure state machines (backoff) and the runner that applies rules."""
