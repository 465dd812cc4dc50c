"""The wiring: settings, the node's services built once, the Tornado app factory, the node's
lifecycle, the `finalmarket` CLI, the dev topology and the embedded servers (`infra`). The only
layer that may import every other."""
