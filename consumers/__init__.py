"""The consuming side: the runtime (queue → validated event → projection → ack), projections, replay."""
