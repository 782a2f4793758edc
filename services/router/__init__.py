"""Router: the public entry; assigns requests to workers by occupancy."""
