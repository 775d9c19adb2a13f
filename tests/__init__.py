"""heron's tests, by layer: unit/ (no model file, no subprocess, no server), integration/
(engines on real models, parity with transformers, the CLI as a subprocess), server/ (the
HTTP server), scaleout/ (Ray); support/ holds what they share."""
