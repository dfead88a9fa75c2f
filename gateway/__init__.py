"""The HTTP gateway (`sntrack gateway`): producers that cannot speak AMQP post events over HTTP.

A producer-side component: it validates with the same gate as the consumers (schemas.gate) and publishes to
ml.events with publisher confirms, as producer/publisher.py does. It imports `schemas`, never `consumers`.
`gateway.client` is importable with nothing but `schemas` and the standard library.
"""
