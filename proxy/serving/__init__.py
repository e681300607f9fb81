"""The serving path: listener handler, routing and sampling, upstreams, circuit breaking, the fallback chain, static
answers and stream replay. It touches bytes only."""
