"""The decision core: pure, takes events and the time, returns effects."""
