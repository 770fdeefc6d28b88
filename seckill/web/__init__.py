"""The HTTP gateway: app factory, routes, handlers, middlewares."""
