"""The gateway's counters, served at GET /metrics in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

from collections import Counter


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status code)
        self.accepted = 0  # events confirmed by the broker and answered 202
        self.rejected: Counter[str] = Counter()  # events refused by the gate, by reason
        # Where a request's time goes (summaries: seconds summed, requests counted): the gate (split, validate,
        # stamp) and awaiting the broker's confirms; the rest of POST → 202 is HTTP and the framework.
        self.seconds: dict[str, list[float]] = {"gate": [0.0, 0], "confirm": [0.0, 0]}

    def observe(self, stage: str, seconds: float) -> None:
        total = self.seconds[stage]
        total[0] += seconds
        total[1] += 1

    def render(self, broker_connected: bool) -> str:
        lines = ["# HELP sntrack_gateway_requests_total HTTP requests answered, by route and status code.",
                 "# TYPE sntrack_gateway_requests_total counter"]
        lines += [f'sntrack_gateway_requests_total{{route="{route}",code="{code}"}} {n}'
                  for (route, code), n in sorted(self.requests.items())]
        lines += ["# HELP sntrack_gateway_events_accepted_total Events confirmed by the broker and acknowledged.",
                  "# TYPE sntrack_gateway_events_accepted_total counter",
                  f"sntrack_gateway_events_accepted_total {self.accepted}",
                  "# HELP sntrack_gateway_events_rejected_total Events refused by the gate, by reason.",
                  "# TYPE sntrack_gateway_events_rejected_total counter"]
        lines += [f'sntrack_gateway_events_rejected_total{{reason="{reason}"}} {n}'
                  for reason, n in sorted(self.rejected.items())]
        for stage, (total, count) in self.seconds.items():
            lines += [f"# HELP sntrack_gateway_{stage}_seconds Time per accepted request spent in the {stage} stage.",
                      f"# TYPE sntrack_gateway_{stage}_seconds summary",
                      f"sntrack_gateway_{stage}_seconds_sum {total:.6f}",
                      f"sntrack_gateway_{stage}_seconds_count {count}"]
        lines += ["# HELP sntrack_gateway_broker_connected 1 while the gateway holds a confirming broker channel.",
                  "# TYPE sntrack_gateway_broker_connected gauge",
                  f"sntrack_gateway_broker_connected {int(broker_connected)}"]
        return "\n".join(lines) + "\n"
