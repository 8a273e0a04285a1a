"""What both HTTP services share: refusal bodies and their OpenAPI declarations, the
bounded 422 handler, and request body limits. Neither service imports the other."""
