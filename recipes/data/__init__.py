"""Small datasets the shipped recipes use."""
