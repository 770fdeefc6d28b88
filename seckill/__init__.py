"""seckill: a flash-sale gateway that pre-locks stock in Redis and shaves the peak."""

__version__ = "0.1.0"
