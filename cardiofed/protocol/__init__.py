"""What crosses the network between node, coordinator and partners: request and response
schemas, and the pure functions a regional relay uses to summarise its round."""
