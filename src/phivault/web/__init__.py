"""The HTTP layer: app factory, middleware, error mapping and route assembly."""
